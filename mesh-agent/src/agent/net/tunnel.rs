//! This node's WireGuard tunnel device `mwg0`, which the VXLAN traffic of
//! encrypted overlays is routed into: made when the node runs a task on an
//! encrypted network, kept in line with its assignment (only changed peers
//! are written), removed when no such task is left.
//!
//! The kernel's WireGuard is used where the kernel has it; elsewhere
//! boringtun in the agent on a TUN device (`--wireguard` chooses). Both
//! carry the node's tunnel address and a route to the cluster's tunnel
//! prefix, and an nftables guard takes packets for that prefix only from
//! the tunnel device.
//!
//! Everything here blocks (netlink on its own runtime): call it from a
//! blocking thread in the node's namespace.

use std::{collections::BTreeMap, net::IpAddr};

use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::error::NetError;
use crate::{
    api::assignment::tunnel::{parse_public_key, TunnelAssignment},
    dataplane::{
        netlink::{Netlink, NetlinkError},
        nftables::{self, TunnelGuard},
        wgtun::UserspaceTunnel,
        wireguard::{self, Key, TunnelPeer, DEVICE},
    },
};

/// WireGuard's overhead on an IPv4 underlay: IP 20, UDP 8, WireGuard 32.
pub(crate) const WIREGUARD_OVERHEAD: u32 = 60;
/// VXLAN's overhead over the IPv6 tunnel addresses: IPv6 40, UDP 8,
/// VXLAN 8, inner Ethernet 14.
pub(crate) const VXLAN6_OVERHEAD: u32 = 70;

/// Which WireGuard implementation the agent uses (`--wireguard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WireguardMode {
    /// The kernel's where it has WireGuard, else userspace.
    #[default]
    Auto,
    /// The kernel's only.
    Kernel,
    /// boringtun in the agent, on a TUN device.
    Userspace,
}

enum Backend {
    Kernel,
    Userspace(UserspaceTunnel),
}

/// What is set up, as last written.
struct Active {
    backend: Backend,
    /// The assignment's tunnel settings the device was made for.
    address: std::net::Ipv6Addr,
    port: u16,
    vxlan_port: u16,
    mtu: u32,
    peers: BTreeMap<Key, TunnelPeer>,
}

/// The node's tunnel.
pub(crate) struct Tunnel {
    private: Zeroizing<Key>,
    mode: WireguardMode,
    active: Option<Active>,
    /// Known to hold no device (after a removal): nothing to clean up.
    clean: bool,
}

impl Tunnel {
    /// Nothing set up yet; `private` is the node's WireGuard key.
    pub(crate) fn new(private: Key, mode: WireguardMode) -> Tunnel {
        Tunnel {
            private: Zeroizing::new(private),
            mode,
            active: None,
            clean: false,
        }
    }

    /// The node's public key.
    pub(crate) fn public_key(&self) -> Key {
        PublicKey::from(&StaticSecret::from(*self.private)).to_bytes()
    }

    /// Its tunnel address, while it is up.
    pub(crate) fn address(&self) -> Option<std::net::Ipv6Addr> {
        self.active.as_ref().map(|a| a.address)
    }

    /// Each peer's traffic and last handshake, while the tunnel is up.
    pub(crate) fn peer_stats(&self) -> Vec<crate::dataplane::wireguard::PeerStats> {
        match self.active.as_ref().map(|a| &a.backend) {
            Some(Backend::Kernel) => wireguard::kernel_peer_stats(DEVICE).unwrap_or_else(|e| {
                log::warn!("reading WireGuard statistics: {e}");
                Vec::new()
            }),
            Some(Backend::Userspace(u)) => u.peer_stats(),
            None => Vec::new(),
        }
    }

    /// Brings the tunnel in line with `want` (removed when `None`).
    /// `underlay_mtu` is the MTU of the data-path link.
    pub(crate) fn apply(&mut self, want: Option<&TunnelAssignment>, underlay_mtu: u32) -> Result<(), NetError> {
        let Some(want) = want else {
            // The first call after a start also clears what an earlier
            // agent may have left.
            if self.active.is_some() || !self.clean {
                self.remove();
            }
            return Ok(());
        };
        let mtu = underlay_mtu.saturating_sub(WIREGUARD_OVERHEAD).max(1280);
        let stale = self.active.as_ref().is_some_and(|a| {
            a.address != want.address || a.port != want.port || a.vxlan_port != want.vxlan_port || a.mtu != mtu
        });
        if stale {
            self.remove();
        }
        if self.active.is_none() {
            self.clean = false;
            self.active = Some(self.create(want, mtu)?);
        }
        let active = self.active.as_mut().expect("reason: set above");
        let wanted = wanted_peers(want);
        let changes = wireguard::plan(&wanted, &active.peers);
        if changes.is_empty() {
            return Ok(());
        }
        log::debug!("tunnel: {} peer change(s)", changes.len());
        let written = match &active.backend {
            Backend::Kernel => wireguard::kernel_apply(DEVICE, None, &changes)
                .map_err(NetError::kernel("configuring the WireGuard peers")),
            Backend::Userspace(u) => {
                u.apply(&changes);
                Ok(())
            }
        };
        match written {
            Ok(()) => {
                active.peers = wanted;
                Ok(())
            }
            Err(e) => {
                // Read the kernel again next time.
                self.remove_state_only();
                Err(e)
            }
        }
    }

    /// Makes (or takes over) the device, its address, route and guard.
    fn create(&self, want: &TunnelAssignment, mtu: u32) -> Result<Active, NetError> {
        let kernel = match self.mode {
            WireguardMode::Kernel => true,
            WireguardMode::Userspace => false,
            WireguardMode::Auto => wireguard::kernel_has_wireguard() || load_wireguard_module(),
        };
        let existing = Netlink::run(|nl| async move {
            match nl.link_kind(DEVICE).await {
                Ok(kind) => Ok(Some(kind.unwrap_or_default())),
                Err(NetlinkError::NoSuchLink(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(NetError::kernel(format!("reading {DEVICE}")))?;
        let wanted_kind = if kernel { "wireguard" } else { "tun" };
        if existing.as_deref().is_some_and(|k| k != wanted_kind) {
            delete_device()?;
        }
        let (backend, peers) = if kernel {
            if existing.as_deref() != Some("wireguard") {
                Netlink::run(|nl| async move { nl.add_wireguard(DEVICE).await }).map_err(NetError::kernel(format!(
                    "making {DEVICE} (this kernel may lack WireGuard: run the agent with --wireguard userspace)"
                )))?;
            }
            let found = wireguard::kernel_observe(DEVICE).map_err(NetError::kernel(format!("reading {DEVICE}")))?;
            if found.private.as_ref() != Some(&*self.private) || found.port != want.port {
                wireguard::kernel_apply(DEVICE, Some((*self.private, want.port)), &[])
                    .map_err(NetError::kernel(format!("configuring {DEVICE}")))?;
            }
            (Backend::Kernel, found.peers)
        } else {
            let tunnel = UserspaceTunnel::start(DEVICE, *self.private, want.port)
                .map_err(NetError::kernel(format!("starting the userspace tunnel {DEVICE}")))?;
            (Backend::Userspace(tunnel), BTreeMap::new())
        };
        let address = want.address;
        let (prefix, prefix_len) = (want.prefix, want.prefix_len);
        Netlink::run(|nl| async move {
            nl.set_mtu(DEVICE, mtu).await?;
            nl.add_address_nodad(DEVICE, IpAddr::V6(address), 128).await?;
            nl.set_up(DEVICE).await?;
            nl.replace_route6_dev(prefix, prefix_len, DEVICE).await
        })
        .map_err(NetError::kernel(format!("setting up {DEVICE}")))?;
        nftables::send_batch(&nftables::tunnel_guard_batch(&TunnelGuard {
            prefix,
            prefix_len,
            device: DEVICE.into(),
            vxlan_port: want.vxlan_port,
        }))
        .map_err(NetError::kernel("installing the tunnel guard"))?;
        log::info!(
            "WireGuard tunnel {DEVICE} up ({}), address {address}, port {}",
            if kernel { "kernel" } else { "userspace" },
            want.port
        );
        Ok(Active {
            backend,
            address,
            port: want.port,
            vxlan_port: want.vxlan_port,
            mtu,
            peers,
        })
    }

    /// Removes the device and its guard (nothing encrypted is left here,
    /// or the node leaves).
    pub(crate) fn remove(&mut self) {
        if let Some(Active {
            backend: Backend::Userspace(u),
            ..
        }) = self.active.take()
        {
            if let Err(e) = u.remove() {
                log::warn!("releasing the TUN device: {e}");
            }
        }
        if let Err(e) = delete_device() {
            log::warn!("{e}");
        }
        match nftables::send_batch(&nftables::remove_tunnel_guard_batch()) {
            Ok(()) => self.clean = true,
            Err(e) => log::warn!("removing the tunnel guard: {e}"),
        }
    }

    /// Forgets what was written (kernel backend), keeping a userspace
    /// device running.
    fn remove_state_only(&mut self) {
        if matches!(
            self.active,
            Some(Active {
                backend: Backend::Kernel,
                ..
            })
        ) {
            self.active = None;
        }
    }
}

/// The peers `want` lists, those whose key parses.
fn wanted_peers(want: &TunnelAssignment) -> BTreeMap<Key, TunnelPeer> {
    want.peers
        .iter()
        .filter_map(|p| {
            let key = parse_public_key(&p.public_key).ok()?;
            Some((
                key,
                TunnelPeer {
                    endpoint: p.endpoint,
                    tunnel: p.address,
                    psk: p.psk.0,
                },
            ))
        })
        .collect()
}

fn delete_device() -> Result<(), NetError> {
    Netlink::run(|nl| async move {
        match nl.delete_link(DEVICE).await {
            Ok(()) | Err(NetlinkError::NoSuchLink(_)) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .map_err(NetError::kernel(format!("removing {DEVICE}")))
}

/// Asks the kernel for the WireGuard module (creating a link of an
/// unknown kind makes it load it), and says whether it is there now.
fn load_wireguard_module() -> bool {
    const PROBE: &str = "mwg-probe";
    let made = Netlink::run(|nl| async move { nl.add_wireguard(PROBE).await }).is_ok();
    if made {
        let _ = Netlink::run(|nl| async move { nl.delete_link(PROBE).await });
    }
    made && wireguard::kernel_has_wireguard()
}
