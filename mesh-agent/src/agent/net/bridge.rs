//! The node-local bridge network every task is attached to (Swarm's
//! docker_gwbridge): a bridge `mesh_gwbridge` in the node's namespace with
//! the pool's first address as gateway, and per task a veth pair whose
//! inside end is the task's `eth0` with an address from the pool and a
//! default route through the bridge. What tasks send beyond the node is
//! masqueraded to the node's address (nf_tables, [`nftables`]).
//!
//! Attach and detach are the path overlay networks extend: one
//! attachment per network, named and addressed by the same steps.

use crate::locks::Locked;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use crate::agent::net::netns::NetNs;
use crate::dataplane::{
    netlink::{Netlink, NetlinkError},
    nftables::{self, Masquerade, NftError},
};

/// The bridge's name.
pub const BRIDGE: &str = "mesh_gwbridge";

/// The default node-local pool (Docker's docker_gwbridge default).
pub(crate) const DEFAULT_POOL: &str = "172.18.0.0/16";

/// Errors of attaching tasks.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No address left.
    #[error("the node-local pool {0} has no free address left")]
    Exhausted(String),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The task's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] crate::agent::net::netns::NetnsError),
    /// Outbound NAT could not be set up.
    #[error("outbound NAT for tasks (nf_tables): {0}; the kernel needs nf_tables with NAT and masquerade (CONFIG_NFT_NAT, CONFIG_NFT_MASQ)")]
    Nat(#[from] NftError),
    /// The blocking worker died.
    #[error("network worker: {0}")]
    Worker(String),
    /// A task left by a previous agent has no usable address.
    #[error("{0}")]
    Adopt(String),
}

use crate::api::error::Invalid;
pub use crate::api::subnet::Subnet;

/// Checks `--local-pool`: a subnet of /8 to /30 (room for the gateway and
/// at least one task).
pub fn check_local_pool(text: &str) -> Result<Subnet, Invalid> {
    let subnet = Subnet::parse(text)?;
    if !(8..=30).contains(&subnet.prefix) {
        return Err(crate::invalid!(
            "invalid --local-pool {text:?}: the prefix length must be 8 to 30"
        ));
    }
    Ok(subnet)
}

/// Addresses handed out from a subnet: the lowest free after the gateway.
#[derive(Clone, Debug)]
pub struct Ipam {
    subnet: Subnet,
    used: BTreeSet<u32>,
}

impl Ipam {
    /// An empty allocator over `subnet`.
    pub fn new(subnet: Subnet) -> Ipam {
        Ipam {
            subnet,
            used: BTreeSet::new(),
        }
    }

    /// Takes the lowest free host address.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let first = u32::from(self.subnet.gateway()) + 1;
        let free = (first..u32::from(self.subnet.broadcast())).find(|a| !self.used.contains(a))?;
        self.used.insert(free);
        Some(Ipv4Addr::from(free))
    }

    /// Marks an address in use (a task adopted after an agent restart);
    /// false if it is outside the subnet or taken.
    pub fn reserve(&mut self, address: Ipv4Addr) -> bool {
        let a = u32::from(address);
        if !self.subnet.contains(address)
            || a <= u32::from(self.subnet.gateway())
            || a >= u32::from(self.subnet.broadcast())
        {
            return false;
        }
        self.used.insert(a)
    }

    /// Gives an address back.
    pub(crate) fn release(&mut self, address: Ipv4Addr) {
        self.used.remove(&u32::from(address));
    }
}

/// A task's place on a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The host-side veth.
    pub(crate) host_link: String,
    /// Its interface index (0: unknown), for the routing mesh to hand
    /// packets straight to the task.
    pub(crate) host_index: u32,
    /// The task's address.
    pub(crate) address: Ipv4Addr,
}

/// The host end of a task's veth: `mv` + 12 hex digits of the task ID
/// (interface names hold at most 15 bytes).
pub(crate) fn host_link_name(task: u64) -> String {
    format!("mv{:012x}", task & 0xffff_ffff_ffff)
}

/// The node-local network: its bridge and the tasks attached to it.
pub struct LocalNetwork {
    subnet: Subnet,
    state: Mutex<(Ipam, BTreeMap<u64, Attachment>)>,
    /// Whether this agent has (re)written the masquerade rule yet.
    nat_ready: AtomicBool,
    /// Bumped whenever a task is attached or detached (the routing mesh
    /// follows the local tasks' addresses).
    changed: tokio::sync::watch::Sender<u64>,
}

impl LocalNetwork {
    /// A network over `subnet`; nothing is created before the first attach.
    pub fn new(subnet: Subnet) -> LocalNetwork {
        LocalNetwork {
            subnet,
            state: Mutex::new((Ipam::new(subnet), BTreeMap::new())),
            nat_ready: AtomicBool::new(false),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Each attached task's address on the bridge.
    pub(crate) fn addresses(&self) -> BTreeMap<u64, Ipv4Addr> {
        let state = self.state.locked();
        state.1.iter().map(|(task, a)| (*task, a.address)).collect()
    }

    /// Each attached task's attachment.
    pub(crate) fn attachments(&self) -> BTreeMap<u64, Attachment> {
        self.state.locked().1.clone()
    }

    /// Wakes when a task is attached or detached.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Creates the bridge (and enables forwarding) if it is not there yet.
    pub async fn ensure_bridge(&self) -> Result<(), NetworkError> {
        let subnet = self.subnet;
        tokio::task::spawn_blocking(move || Netlink::run(|nl| async move { ensure_bridge(&nl, subnet).await }))
            .await
            .map_err(|e| NetworkError::Worker(e.to_string()))??;
        Ok(())
    }

    /// The masquerade rule for this network's tasks.
    fn masquerade(&self) -> Masquerade {
        Masquerade {
            source: self.subnet.base,
            prefix: self.subnet.prefix,
            exempt_oif: BRIDGE.into(),
        }
    }

    /// Removes the bridge and the NAT table (the node leaves the swarm;
    /// its tasks are stopped already).
    pub(crate) async fn remove(&self) {
        let removed = tokio::task::spawn_blocking(|| {
            Netlink::run(|nl| async move {
                match nl.delete_link(BRIDGE).await {
                    Err(NetlinkError::NoSuchLink(_)) => Ok(()),
                    other => other,
                }
            })
            .map_err(NetworkError::from)?;
            nftables::send_batch(&nftables::remove_batch()).map_err(NetworkError::from)
        })
        .await;
        self.nat_ready.store(false, Ordering::SeqCst);
        match removed {
            Ok(Err(e)) => log::warn!("removing the node bridge: {e}"),
            Err(e) => log::warn!("removing the node bridge: {e}"),
            Ok(Ok(())) => {}
        }
    }

    /// Gives task `task` (whose namespace is bind-mounted at `netns`) an
    /// `eth0` on the bridge with an address and a default route.
    pub async fn attach(&self, task: u64, netns: &Path) -> Result<Attachment, NetworkError> {
        let address = {
            let mut state = self.state.locked();
            state
                .0
                .allocate()
                .ok_or_else(|| NetworkError::Exhausted(self.subnet.to_string()))?
        };
        let mut attachment = Attachment {
            host_link: host_link_name(task),
            host_index: 0,
            address,
        };
        let (subnet, netns, a) = (self.subnet, netns.to_path_buf(), attachment.clone());
        // The first attach of this agent rewrites the rule: an earlier
        // agent may have left one for another pool.
        let nat = (!self.nat_ready.load(Ordering::SeqCst)).then(|| self.masquerade());
        let nat_wanted = nat.is_some();
        let done = tokio::task::spawn_blocking(move || wire(subnet, &netns, &a, nat.as_ref()))
            .await
            .map_err(|e| NetworkError::Worker(e.to_string()))
            .and_then(|r| r);
        let mut state = self.state.locked();
        match done {
            Ok(index) => {
                attachment.host_index = index;
                if nat_wanted {
                    self.nat_ready.store(true, Ordering::SeqCst);
                }
                state.1.insert(task, attachment.clone());
                drop(state);
                self.bump();
                Ok(attachment)
            }
            Err(e) => {
                state.0.release(address);
                Err(e)
            }
        }
    }

    /// Takes over task `task`'s attachment as a previous agent left it
    /// (namespace at `netns`): its `eth0` address is read from the kernel
    /// and reserved, and nothing is changed. A task already taken over
    /// keeps the attachment it has.
    pub(crate) async fn adopt(&self, task: u64, netns: &Path) -> Result<Attachment, NetworkError> {
        if let Some(known) = self.state.locked().1.get(&task) {
            return Ok(known.clone());
        }
        let (netns, subnet, host_link) = (netns.to_path_buf(), self.subnet, host_link_name(task));
        let name = host_link.clone();
        let (addresses, host_index) = tokio::task::spawn_blocking(move || -> Result<_, NetworkError> {
            let ns = NetNs::open_at(&netns, "task")?;
            let addresses = ns.run(|| Netlink::run(|nl| async move { nl.global_addresses().await }))??;
            // A veth that is not there leaves the task to the bridge's path.
            let index = Netlink::run(|nl| async move { nl.link_index(&name).await }).unwrap_or(0);
            Ok((addresses, index))
        })
        .await
        .map_err(|e| NetworkError::Worker(e.to_string()))??;
        let address = addresses
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) if subnet.contains(v4) => Some(v4),
                _ => None,
            })
            .ok_or_else(|| NetworkError::Adopt(format!("the task has no address in {subnet}")))?;
        let attachment = Attachment {
            host_link,
            host_index,
            address,
        };
        let mut state = self.state.locked();
        if !state.0.reserve(address) {
            return Err(NetworkError::Adopt(format!(
                "address {address} is taken by another task"
            )));
        }
        state.1.insert(task, attachment.clone());
        drop(state);
        self.bump();
        Ok(attachment)
    }

    /// Removes task `task`'s veth and frees its address.
    pub async fn detach(&self, task: u64) {
        let attachment = {
            let mut state = self.state.locked();
            let Some(a) = state.1.remove(&task) else { return };
            state.0.release(a.address);
            a
        };
        self.bump();
        let name = attachment.host_link.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            Netlink::run(|nl| async move {
                match nl.delete_link(&name).await {
                    // Gone with its namespace already.
                    Err(NetlinkError::NoSuchLink(_)) => Ok(()),
                    other => other,
                }
            })
        })
        .await;
        if let Ok(Err(e)) = deleted {
            log::warn!("detaching task {task}: {e}");
        }
    }
}

/// The kernel side of an attach (blocking: runs its own netlink runtimes);
/// the host-side veth's index.
fn wire(subnet: Subnet, netns: &Path, a: &Attachment, nat: Option<&Masquerade>) -> Result<u32, NetworkError> {
    let ns = NetNs::open_at(netns, "task")?;
    let gateway = subnet.gateway();
    Netlink::run(|nl| async move { ensure_bridge(&nl, subnet).await })?;
    if let Some(rule) = nat {
        nftables::send_batch(&nftables::masquerade_batch(rule))?;
    }
    let index = Netlink::run(|nl| async move {
        let _ = nl.delete_link(&a.host_link).await;
        nl.add_veth(&a.host_link, "eth0", Some(ns.fd()), None, None).await?;
        nl.set_controller(&a.host_link, BRIDGE).await?;
        nl.set_up(&a.host_link).await?;
        nl.link_index(&a.host_link).await
    })?;
    let ns = NetNs::open_at(netns, "task")?;
    let address = a.address;
    ns.run(move || {
        Netlink::run(|nl| async move {
            nl.set_up("lo").await?;
            nl.add_address("eth0", IpAddr::V4(address), subnet.prefix).await?;
            nl.set_up("eth0").await?;
            nl.add_default_route(gateway).await
        })
    })??;
    Ok(index)
}

/// Creates the bridge with the gateway address, once; enables forwarding
/// so tasks reach beyond the node. Callers race (a task's attach and the
/// routing mesh's sync): whoever comes second finds the bridge or the
/// address made, and that is success.
async fn ensure_bridge(nl: &Netlink, subnet: Subnet) -> Result<(), NetlinkError> {
    let made_by_another = |r: Result<(), NetlinkError>| match r {
        Err(e) if e.already_exists() => Ok(()),
        other => other,
    };
    match nl.link_index(BRIDGE).await {
        Ok(_) => {}
        Err(NetlinkError::NoSuchLink(_)) => made_by_another(nl.add_bridge(BRIDGE).await)?,
        Err(e) => return Err(e),
    }
    let gateway = IpAddr::V4(subnet.gateway());
    if !nl.has_address(BRIDGE, gateway).await? {
        made_by_another(nl.add_address(BRIDGE, gateway, subnet.prefix).await)?;
    }
    nl.set_up(BRIDGE).await?;
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        log::warn!("enabling IPv4 forwarding: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_refuse_nonsense() {
        let s = check_local_pool("172.18.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(172, 18, 0, 1));
        for (bad, why) in [
            ("172.18.0.0", "A.B.C.D/N"),
            ("172.18.0.1/16", "host bits"),
            ("172.18.0.0/31", "8 to 30"),
            ("nope/16", "not an IPv4"),
        ] {
            assert!(check_local_pool(bad).unwrap_err().contains(why), "{bad}");
        }
    }

    #[test]
    fn addresses_are_handed_out_lowest_first_and_reused() {
        let mut ipam = Ipam::new(Subnet::parse("10.0.0.0/30").unwrap());
        assert_eq!(ipam.allocate(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(ipam.allocate(), None, "a /30 has one task address after the gateway");
        ipam.release(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ipam.allocate(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(host_link_name(0xabc), "mv000000000abc");
        assert!(host_link_name(u64::MAX).len() <= 15);
    }
}
