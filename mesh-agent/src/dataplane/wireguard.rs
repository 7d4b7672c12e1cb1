//! The node's WireGuard tunnels, as plain data ([`TunnelPeer`], [`plan`])
//! and, where the kernel has WireGuard, configured through its generic
//! netlink family (`wg set` without the `wg` tool). Where it has not, the
//! same plan drives the userspace device in [`super::wgtun`].
//!
//! Each peer is another node: its public key, where its WireGuard socket
//! is, the one tunnel address it may send from (its /128), and the
//! preshared key of the pair.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use netlink_packet_core::{DecodeError, Emitable, NlaBuffer, NlasIterator, ParseableParametrized};
use netlink_packet_generic::{GenlFamily, GenlHeader};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::genl::{Genl, GenlError};

/// A WireGuard key (private, public or preshared).
pub(crate) type Key = [u8; 32];

/// The name of the node's WireGuard device.
pub const DEVICE: &str = "mwg0";

/// One remote node as this node's tunnel wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelPeer {
    /// Its WireGuard socket (data-path address, WireGuard port).
    pub endpoint: SocketAddr,
    /// Its tunnel address: the only source it may send from.
    pub tunnel: Ipv6Addr,
    /// The pair's preshared key.
    pub psk: Key,
}

/// One change to the device's peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Add the peer, or bring it in line (its sessions are kept: a new
    /// preshared key or endpoint takes effect at the next handshake).
    Set { key: Key, peer: TunnelPeer },
    /// Remove the peer and its sessions.
    Remove { key: Key },
}

/// The changes from `current` peers to `wanted` ones, removals first (a
/// node's tunnel address moving to a new key must be free first).
pub(crate) fn plan(wanted: &BTreeMap<Key, TunnelPeer>, current: &BTreeMap<Key, TunnelPeer>) -> Vec<PeerChange> {
    let mut changes: Vec<PeerChange> = current
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(|&key| PeerChange::Remove { key })
        .collect();
    for (&key, peer) in wanted {
        if current.get(&key) != Some(peer) {
            changes.push(PeerChange::Set {
                key,
                peer: peer.clone(),
            });
        }
    }
    changes
}

/// Whether the kernel can make WireGuard devices (its generic netlink
/// family is there once the module is loaded or built in).
pub fn kernel_has_wireguard() -> bool {
    Genl::open("wireguard").is_ok()
}

/// What a kernel WireGuard device holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelDevice {
    /// Its private key, if set.
    pub private: Option<Key>,
    /// Its listening port.
    pub port: u16,
    /// Its peers.
    pub peers: BTreeMap<Key, TunnelPeer>,
}

/// A kernel WireGuard device's private key, port and peers (`wg show`).
pub fn kernel_observe(device: &str) -> Result<KernelDevice, GenlError> {
    let mut genl = Genl::open("wireguard")?;
    let replies = genl.dump(Checked(WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(device.into())],
    }))?;
    Ok(device_of(replies.into_iter().map(|r| r.0).collect()))
}

/// The device a `GET_DEVICE` dump's replies describe.
pub fn device_of(replies: Vec<WireguardMessage>) -> KernelDevice {
    let (mut private, mut port, mut peers) = (None, 0, BTreeMap::new());
    for attr in replies.into_iter().flat_map(|m| m.attributes) {
        match attr {
            WireguardAttribute::PrivateKey(k) => private = Some(k).filter(|k| k != &[0; 32]),
            WireguardAttribute::ListenPort(p) => port = p,
            WireguardAttribute::Peers(list) => {
                for WireguardPeer(attrs) in list {
                    if let Some((key, peer)) = parse_peer(attrs) {
                        peers.insert(key, peer);
                    }
                }
            }
            _ => {}
        }
    }
    KernelDevice { private, port, peers }
}

/// A peer as the kernel reports it: its public key and what the agent
/// manages of it (an address list other than one /128 reads as `::`, so
/// it gets replaced). `None` without a public key.
pub fn parse_peer(attrs: Vec<WireguardPeerAttribute>) -> Option<(Key, TunnelPeer)> {
    let (mut key, mut endpoint, mut tunnel, mut psk) = (None, None, None, [0; 32]);
    for a in attrs {
        match a {
            WireguardPeerAttribute::PublicKey(k) => key = Some(k),
            WireguardPeerAttribute::PresharedKey(k) => psk = k,
            WireguardPeerAttribute::Endpoint(e) => endpoint = Some(e),
            WireguardPeerAttribute::AllowedIps(ips) => {
                for WireguardAllowedIp(ip) in ips {
                    let mut address = None;
                    let mut cidr = 0;
                    for part in ip {
                        match part {
                            WireguardAllowedIpAttr::IpAddr(IpAddr::V6(a)) => address = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = c,
                            _ => {}
                        }
                    }
                    // Anything but one /128 is not ours, and is replaced.
                    if cidr == 128 && tunnel.is_none() {
                        tunnel = address;
                    } else {
                        tunnel = Some(Ipv6Addr::UNSPECIFIED);
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        key?,
        TunnelPeer {
            endpoint: endpoint.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            tunnel: tunnel.unwrap_or(Ipv6Addr::UNSPECIFIED),
            psk,
        },
    ))
}

/// One peer's traffic and session, for the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStats {
    /// The peer's tunnel address (which node it is).
    pub(crate) tunnel: Ipv6Addr,
    /// Seconds since its last handshake; `None` before the first.
    pub handshake_age_s: Option<f64>,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
}

/// A kernel WireGuard device's per-peer statistics (`wg show DEVICE dump`).
pub(crate) fn kernel_peer_stats(device: &str) -> Result<Vec<PeerStats>, GenlError> {
    let mut genl = Genl::open("wireguard")?;
    let replies = genl.dump(Checked(WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(device.into())],
    }))?;
    let replies = replies.into_iter().map(|r| r.0).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    Ok(peer_stats_of(replies, now))
}

/// Each peer's statistics in a `GET_DEVICE` dump's replies, `now` being
/// the time in Unix seconds.
pub fn peer_stats_of(replies: Vec<WireguardMessage>, now: f64) -> Vec<PeerStats> {
    let mut out = Vec::new();
    for attr in replies.into_iter().flat_map(|m| m.attributes) {
        let WireguardAttribute::Peers(list) = attr else {
            continue;
        };
        for WireguardPeer(attrs) in list {
            let mut stats = PeerStats {
                tunnel: Ipv6Addr::UNSPECIFIED,
                handshake_age_s: None,
                rx_bytes: 0,
                tx_bytes: 0,
            };
            for a in &attrs {
                match a {
                    WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                        let at = t.seconds as f64 + t.nano_seconds as f64 / 1e9;
                        stats.handshake_age_s = Some((now - at).max(0.0));
                    }
                    WireguardPeerAttribute::RxBytes(n) => stats.rx_bytes = *n,
                    WireguardPeerAttribute::TxBytes(n) => stats.tx_bytes = *n,
                    _ => {}
                }
            }
            if let Some((_, peer)) = parse_peer(attrs) {
                stats.tunnel = peer.tunnel;
                out.push(stats);
            }
        }
    }
    out
}

/// Sets the device's private key and port, then carries out `changes`
/// (`wg set DEVICE private-key K listen-port P peer ...`). The private key
/// and port are only sent when `identity` is given, since a new private
/// key ends every session.
pub(crate) fn kernel_apply(
    device: &str,
    identity: Option<(Key, u16)>,
    changes: &[PeerChange],
) -> Result<(), GenlError> {
    let mut genl = Genl::open("wireguard")?;
    if let Some((private, port)) = identity {
        genl.request(Checked(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(device.into()),
                WireguardAttribute::PrivateKey(private),
                WireguardAttribute::ListenPort(port),
            ],
        }))?;
    }
    // A few peers per message keeps each under the socket's buffer.
    for chunk in changes.chunks(16) {
        let peers = chunk.iter().map(peer_message).collect();
        genl.request(Checked(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(device.into()),
                WireguardAttribute::Peers(peers),
            ],
        }))?;
    }
    Ok(())
}

/// The WireGuard family's messages as the agent sends and reads them:
/// netlink-packet-wireguard's, except that a reply it would panic on is a
/// decode error instead. Its 0.5.0 (the newest) indexes the first byte of
/// an allowed IP's CIDR attribute without checking there is one
/// (allowedip.rs, `payload[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked(pub WireguardMessage);

impl GenlFamily for Checked {
    fn family_name() -> &'static str {
        WireguardMessage::family_name()
    }

    fn version(&self) -> u8 {
        self.0.version()
    }

    fn command(&self) -> u8 {
        self.0.command()
    }
}

impl Emitable for Checked {
    fn buffer_len(&self) -> usize {
        self.0.buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.0.emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Checked {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        if let Some(empty) = empty_cidr(buf) {
            return Err(DecodeError::from(format!(
                "an allowed IP's CIDR attribute is empty (at byte {empty})"
            )));
        }
        WireguardMessage::parse_with_param(buf, header).map(Checked)
    }
}

/// Where a device's attributes hold an empty WGALLOWEDIP_A_CIDR_MASK
/// (peers -> peer -> allowed IPs -> allowed IP -> CIDR), walking the
/// attributes as netlink-packet-core does; a malformed attribute ends the
/// walk, since the real parser refuses it there.
fn empty_cidr(attrs: &[u8]) -> Option<usize> {
    const WGDEVICE_A_PEERS: u16 = 8;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
    fn nested(bytes: &[u8]) -> Vec<NlaBuffer<&[u8]>> {
        NlasIterator::new(bytes).map_while(Result::ok).collect()
    }
    let base = attrs.as_ptr() as usize;
    for device in nested(attrs).into_iter().filter(|a| a.kind() == WGDEVICE_A_PEERS) {
        for peer in nested(device.value()) {
            for ips in nested(peer.value())
                .into_iter()
                .filter(|a| a.kind() == WGPEER_A_ALLOWEDIPS)
            {
                for ip in nested(ips.value()) {
                    if let Some(cidr) = nested(ip.value())
                        .into_iter()
                        .find(|a| a.kind() == WGALLOWEDIP_A_CIDR_MASK && a.value().is_empty())
                    {
                        return Some(cidr.value().as_ptr() as usize - base);
                    }
                }
            }
        }
    }
    None
}

/// A change as the peer attributes of a `SET_DEVICE` request.
pub fn peer_message(change: &PeerChange) -> WireguardPeer {
    match change {
        PeerChange::Remove { key } => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]),
        PeerChange::Set { key, peer } => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            WireguardPeerAttribute::PresharedKey(peer.psk),
            WireguardPeerAttribute::Endpoint(peer.endpoint),
            WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                WireguardAllowedIpAttr::IpAddr(IpAddr::V6(peer.tunnel)),
                WireguardAllowedIpAttr::Cidr(128),
            ])]),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8, psk: u8) -> TunnelPeer {
        TunnelPeer {
            endpoint: SocketAddr::from(([192, 0, 2, n], 51820)),
            tunnel: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n)),
            psk: [psk; 32],
        }
    }

    #[test]
    fn only_what_differs_is_written_and_removals_come_first() {
        let current: BTreeMap<Key, TunnelPeer> = [([1; 32], peer(1, 1)), ([2; 32], peer(2, 1))].into();
        assert!(plan(&current, &current).is_empty());
        let wanted: BTreeMap<Key, TunnelPeer> = [([1; 32], peer(1, 2)), ([3; 32], peer(2, 2))].into();
        assert_eq!(
            plan(&wanted, &current),
            vec![
                PeerChange::Remove { key: [2; 32] },
                PeerChange::Set {
                    key: [1; 32],
                    peer: peer(1, 2)
                },
                PeerChange::Set {
                    key: [3; 32],
                    peer: peer(2, 2)
                },
            ],
            "node 2's new key gets its address only after the old key is gone"
        );
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// Found by the netlink fuzz target: netlink-packet-wireguard 0.5.0
    /// panics on an allowed IP whose CIDR attribute is empty.
    #[test]
    fn a_reply_with_an_empty_cidr_is_a_decode_error_not_a_panic() {
        const NESTED: u16 = 1 << 15;
        let allowed_ip = |cidr: &[u8]| nla(NESTED, &nla(3, cidr));
        let device = |cidr: &[u8]| {
            let peer = nla(NESTED, &nla(9 | NESTED, &allowed_ip(cidr)));
            nla(8 | NESTED, &peer)
        };
        let header = GenlHeader { cmd: 0, version: 1 };
        assert!(empty_cidr(&device(&[])).is_some(), "the walk finds it");
        assert!(Checked::parse_with_param(&device(&[]), header).is_err());
        assert_eq!(empty_cidr(&device(&[128])), None);
        let parsed = Checked::parse_with_param(&device(&[128]), header).expect("a CIDR of one byte parses");
        let WireguardAttribute::Peers(peers) = &parsed.0.attributes[0] else {
            panic!("{parsed:?}")
        };
        assert_eq!(peers.len(), 1);
    }

    #[test]
    fn a_peer_message_reads_back_as_the_same_peer() {
        let change = PeerChange::Set {
            key: [7; 32],
            peer: peer(7, 9),
        };
        let WireguardPeer(attrs) = peer_message(&change);
        assert_eq!(parse_peer(attrs), Some(([7; 32], peer(7, 9))));
    }
}
