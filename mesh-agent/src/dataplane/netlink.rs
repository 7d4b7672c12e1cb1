//! Links and addresses through rtnetlink (route netlink), in the calling
//! thread's network namespace. Each request's doc names the `ip` command it
//! equals.
//!
//! A [`Netlink`] handle is bound to the namespace its socket was opened in,
//! so it is opened with [`Netlink::run`] on the thread that entered it.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, BorrowedFd},
};

use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
        AddressFamily,
    },
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
};

/// An Ethernet address.
pub(crate) type Mac = [u8; 6];

/// A link as a dump lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    /// Its name.
    pub(crate) name: String,
    /// Its index.
    pub(crate) index: u32,
    /// Its MTU.
    pub(crate) mtu: u32,
    /// The source address it encapsulates from, for a VXLAN device.
    pub(crate) vxlan_local: Option<IpAddr>,
    /// The UDP port it sends to and listens on, for a VXLAN device.
    pub(crate) vxlan_port: Option<u16>,
}

/// How a VXLAN device is made (`ip link add NAME type vxlan id VNI local
/// LOCAL dstport PORT nolearning proxy mtu MTU`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VxlanLink {
    /// Its name.
    pub(crate) name: String,
    /// The VXLAN network identifier.
    pub(crate) vni: u32,
    /// The source address of the encapsulated packets (the data-path
    /// address, or the node's tunnel address on an encrypted network).
    pub(crate) local: IpAddr,
    /// The UDP port.
    pub(crate) port: u16,
    /// Its MTU.
    pub(crate) mtu: u32,
}

/// Errors of netlink requests.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket or its runtime could not be set up.
    #[error("cannot open a route netlink socket: {0}")]
    Connection(#[source] std::io::Error),
    /// No link of that name in this namespace.
    #[error("no link named {0:?} in this network namespace")]
    NoSuchLink(String),
    /// The kernel refused a request.
    #[error("`{command}` failed: {source}")]
    Request { command: String, source: rtnetlink::Error },
}

impl NetlinkError {
    /// Whether the kernel refused because the object is there already
    /// (EEXIST): someone else made it first.
    pub(crate) fn already_exists(&self) -> bool {
        matches!(self, NetlinkError::Request { source: rtnetlink::Error::NetlinkError(e), .. } if e.raw_code() == -libc::EEXIST)
    }
}

/// A route netlink handle bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a socket in the calling thread's namespace and runs `work` on
    /// a current-thread runtime, so the socket never leaves this thread.
    pub fn run<T, F, Fut>(work: F) -> Result<T, NetlinkError>
    where
        F: FnOnce(Netlink) -> Fut,
        Fut: Future<Output = Result<T, NetlinkError>>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Connection)?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connection)?;
            let driver = tokio::spawn(connection);
            let result = work(Netlink { handle }).await;
            driver.abort();
            result
        })
    }

    /// The index of link `name` (`ip link show NAME`).
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::NoSuchLink(name.to_owned())),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(NetlinkError::NoSuchLink(name.to_owned()))
            }
            Err(source) => Err(request(format!("ip link show {name}"), source)),
        }
    }

    /// `ip link add NAME type bridge`
    pub async fn add_bridge(&self, name: &str) -> Result<(), NetlinkError> {
        self.add_link(LinkBridge::new(name).build(), format!("ip link add {name} type bridge"))
            .await
    }

    /// `ip link add NAME [mtu MTU] type veth peer name PEER [address MAC]
    /// [mtu MTU] [netns NS]`: the peer is created straight inside
    /// `peer_netns` when given.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
        mtu: Option<u32>,
        peer_mac: Option<Mac>,
    ) -> Result<(), NetlinkError> {
        let mut peer_message = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
        if let Some(ns) = peer_netns {
            peer_message = peer_message.setns_by_fd(ns.as_raw_fd());
        }
        if let Some(mac) = peer_mac {
            peer_message = peer_message.address(mac.to_vec());
        }
        let mut builder = LinkVeth::new(name, peer);
        if let Some(mtu) = mtu {
            peer_message = peer_message.mtu(mtu);
            builder = builder.mtu(mtu);
        }
        let message = builder
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())))
            .build();
        let netns = if peer_netns.is_some() { " netns ..." } else { "" };
        self.add_link(message, format!("ip link add {name} type veth peer name {peer}{netns}"))
            .await
    }

    /// `ip link add NAME type vxlan id VNI local LOCAL dstport PORT
    /// nolearning proxy mtu MTU`: no learning and no default destination,
    /// so only the static FDB entries say where a frame goes; `proxy`
    /// answers ARP from the neighbour entries instead of flooding.
    pub(crate) async fn add_vxlan(&self, link: &VxlanLink) -> Result<(), NetlinkError> {
        let builder = match link.local {
            IpAddr::V4(a) => LinkVxlan::new(&link.name, link.vni).local(a),
            IpAddr::V6(a) => LinkVxlan::new(&link.name, link.vni).local6(a),
        };
        let message = builder
            .port(link.port)
            .learning(false)
            .proxy(true)
            .mtu(link.mtu)
            .build();
        self.add_link(
            message,
            format!(
                "ip link add {} type vxlan id {} local {} dstport {} nolearning proxy mtu {}",
                link.name, link.vni, link.local, link.port, link.mtu
            ),
        )
        .await
    }

    /// `ip link add NAME type vxlan external dstport PORT`: a metadata-mode
    /// device whose remote end eBPF sets per packet (bpf_skb_set_tunnel_key).
    pub(crate) async fn add_vxlan_external(&self, name: &str, port: u16) -> Result<(), NetlinkError> {
        let message = LinkVxlan::new(name, 0)
            .port(port)
            .learning(false)
            .collect_metadata(true)
            .build();
        self.add_link(
            message,
            format!("ip link add {name} type vxlan external dstport {port}"),
        )
        .await
    }

    /// `ip link set NAME mtu MTU`
    pub(crate) async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let message = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(message, format!("ip link set {name} mtu {mtu}")).await
    }

    /// Every link of this namespace (`ip link show`).
    pub(crate) async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let mut out = Vec::new();
        let mut dump = self.handle.link().get().execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| request("ip link show".into(), e))? {
            let mut info = LinkInfo {
                name: String::new(),
                index: msg.header.index,
                mtu: 0,
                vxlan_local: None,
                vxlan_port: None,
            };
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => info.name = n.clone(),
                    LinkAttribute::Mtu(m) => info.mtu = *m,
                    LinkAttribute::LinkInfo(parts) => {
                        info.vxlan_local = vxlan_local(parts);
                        info.vxlan_port = vxlan_port(parts);
                    }
                    _ => {}
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// The static remote entries of VXLAN device `index` (`bridge fdb show
    /// dev NAME`, those with a `dst`).
    pub(crate) async fn fdb_entries(&self, index: u32) -> Result<Vec<(Mac, IpAddr)>, NetlinkError> {
        let entries = self
            .neighbour_dump(AddressFamily::Bridge, index, "bridge fdb show")
            .await?;
        Ok(entries.into_iter().map(|(_, mac, dst)| (mac, dst)).collect())
    }
    /// `bridge fdb replace MAC dev NAME self dst DST permanent`
    pub(crate) async fn set_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .destination(dst)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                request(
                    format!(
                        "bridge fdb replace {} dev #{index} self dst {dst} permanent",
                        mac_text(mac)
                    ),
                    e,
                )
            })
    }

    /// `bridge fdb del MAC dev NAME self dst DST`
    pub(crate) async fn delete_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        message
            .attributes
            .push(NeighbourAttribute::Destination(address_of(dst)));
        self.handle.neighbours().del(message).execute().await.map_err(|e| {
            request(
                format!("bridge fdb del {} dev #{index} self dst {dst}", mac_text(mac)),
                e,
            )
        })
    }

    /// The permanent IPv4 neighbour entries of link `index` (`ip neigh show
    /// dev NAME nud permanent`).
    pub(crate) async fn neighbours(&self, index: u32) -> Result<Vec<(Ipv4Addr, Mac)>, NetlinkError> {
        let entries = self.neighbour_dump(AddressFamily::Inet, index, "ip neigh show").await?;
        Ok(entries
            .into_iter()
            .filter_map(|(state, mac, ip)| match ip {
                IpAddr::V4(v4) if state == NeighbourState::Permanent => Some((v4, mac)),
                _ => None,
            })
            .collect())
    }

    /// Link `index`'s entries of a neighbour dump (ARP or FDB) that have
    /// both a MAC and an IP address.
    async fn neighbour_dump(
        &self,
        family: AddressFamily,
        index: u32,
        command: &str,
    ) -> Result<Vec<(NeighbourState, Mac, IpAddr)>, NetlinkError> {
        let mut out = Vec::new();
        let mut dump = self.handle.neighbours().get().set_address_family(family).execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| request(command.into(), e))? {
            if msg.header.ifindex != index {
                continue;
            }
            let (mut mac, mut ip) = (None, None);
            for a in &msg.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::try_from(l.as_slice()).ok(),
                    NeighbourAttribute::Destination(d) => ip = ip_of(d),
                    _ => {}
                }
            }
            if let (Some(mac), Some(ip)) = (mac, ip) {
                out.push((msg.header.state, mac, ip));
            }
        }
        Ok(out)
    }

    /// `ip neigh replace IP lladdr MAC dev NAME nud permanent`
    pub(crate) async fn set_neighbour(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                request(
                    format!(
                        "ip neigh replace {ip} lladdr {} dev #{index} nud permanent",
                        mac_text(mac)
                    ),
                    e,
                )
            })
    }

    /// `ip neigh del IP dev NAME`
    pub(crate) async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        self.handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(|e| request(format!("ip neigh del {ip} dev #{index}"), e))
    }

    /// `ip link set NAME up`
    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        self.set_admin_state(name, true).await
    }

    /// `ip link set NAME down`
    pub async fn set_down(&self, name: &str) -> Result<(), NetlinkError> {
        self.set_admin_state(name, false).await
    }

    async fn set_admin_state(&self, name: &str, up: bool) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let link = LinkUnspec::new_with_index(index);
        let (message, state) = if up { (link.up(), "up") } else { (link.down(), "down") };
        self.set_link(message.build(), format!("ip link set {name} {state}"))
            .await
    }

    /// `ip link set NAME master BRIDGE`
    pub async fn set_controller(&self, name: &str, bridge: &str) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let bridge_index = self.link_index(bridge).await?;
        let message = LinkUnspec::new_with_index(index).controller(bridge_index).build();
        self.set_link(message, format!("ip link set {name} master {bridge}"))
            .await
    }

    /// `ip addr add ADDRESS/PREFIX dev NAME`
    pub async fn add_address(&self, name: &str, address: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        self.handle
            .address()
            .add(index, address, prefix)
            .execute()
            .await
            .map_err(|e| request(format!("ip addr add {address}/{prefix} dev {name}"), e))
    }

    /// `ip addr add ADDRESS/PREFIX dev NAME nodad`: an address that is
    /// usable at once (no duplicate detection: it is unique by design).
    pub(crate) async fn add_address_nodad(&self, name: &str, address: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
        let index = self.link_index(name).await?;
        let mut add = self.handle.address().add(index, address, prefix).replace();
        add.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        add.execute()
            .await
            .map_err(|e| request(format!("ip addr replace {address}/{prefix} dev {name} nodad"), e))
    }

    /// `ip -6 route replace PREFIX/LEN dev NAME`
    pub(crate) async fn replace_route6_dev(&self, prefix: Ipv6Addr, len: u8, name: &str) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let message = rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(prefix, len)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| request(format!("ip -6 route replace {prefix}/{len} dev {name}"), e))
    }

    /// `ip link add NAME type wireguard`
    pub(crate) async fn add_wireguard(&self, name: &str) -> Result<(), NetlinkError> {
        self.add_link(
            rtnetlink::LinkWireguard::new(name).build(),
            format!("ip link add {name} type wireguard"),
        )
        .await
    }

    /// The kind of link `name` (`ip -d link show NAME`), if it has one.
    pub(crate) async fn link_kind(&self, name: &str) -> Result<Option<String>, NetlinkError> {
        use rtnetlink::packet_route::link::LinkInfo as Part;
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => return Err(NetlinkError::NoSuchLink(name.to_owned())),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(NetlinkError::NoSuchLink(name.to_owned()))
            }
            Err(source) => return Err(request(format!("ip -d link show {name}"), source)),
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(parts) => parts.iter().find_map(|p| match p {
                Part::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The global-scope addresses of this namespace (`ip addr show scope global`).
    pub async fn global_addresses(&self) -> Result<Vec<IpAddr>, NetlinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
        let mut out = Vec::new();
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| request("ip addr show".into(), e))? {
            if msg.header.scope != AddressScope::Universe {
                continue;
            }
            out.extend(msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// The prefix length `address` was given (`ip addr show to ADDRESS`).
    pub(crate) async fn address_prefix(&self, address: IpAddr) -> Result<Option<u8>, NetlinkError> {
        Ok(self.address_header(address).await?.map(|(_, prefix)| prefix))
    }

    /// The index of the link holding `address` (`ip addr show to ADDRESS`).
    pub(crate) async fn link_with_address(&self, address: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.address_header(address).await?.map(|(index, _)| index))
    }

    /// (link index, prefix length) of `address`, if this namespace has it.
    async fn address_header(&self, address: IpAddr) -> Result<Option<(u32, u8)>, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| request("ip addr show".into(), e))? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == address))
            {
                return Ok(Some((msg.header.index, msg.header.prefix_len)));
            }
        }
        Ok(None)
    }

    /// `ip route add default via GATEWAY`
    pub(crate) async fn add_default_route(&self, gateway: std::net::Ipv4Addr) -> Result<(), NetlinkError> {
        let message = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(|e| request(format!("ip route add default via {gateway}"), e))
    }

    /// Whether `address` is on link `name` (`ip addr show dev NAME`).
    pub(crate) async fn has_address(&self, name: &str, address: IpAddr) -> Result<bool, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let index = self.link_index(name).await?;
        let mut dump = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| request(format!("ip addr show dev {name}"), e))?
        {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == address))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `ip link del NAME`
    pub(crate) async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| request(format!("ip link del {name}"), e))
    }

    async fn add_link(&self, message: LinkMessage, command: String) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| request(command, e))
    }

    async fn set_link(&self, message: LinkMessage, command: String) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| request(command, e))
    }
}

/// The local address of a VXLAN link's info, if it is one.
fn vxlan_local(parts: &[rtnetlink::packet_route::link::LinkInfo]) -> Option<IpAddr> {
    use rtnetlink::packet_route::link::{InfoVxlan, LinkInfo as Part};
    parts.iter().find_map(|p| match p {
        Part::Data(InfoData::Vxlan(data)) => data.iter().find_map(|d| match d {
            InfoVxlan::Local(a) => Some(IpAddr::V4(*a)),
            InfoVxlan::Local6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        }),
        _ => None,
    })
}

/// The UDP port of a VXLAN link's info, if it is one.
fn vxlan_port(parts: &[rtnetlink::packet_route::link::LinkInfo]) -> Option<u16> {
    use rtnetlink::packet_route::link::{InfoVxlan, LinkInfo as Part};
    parts.iter().find_map(|p| match p {
        Part::Data(InfoData::Vxlan(data)) => data.iter().find_map(|d| match d {
            InfoVxlan::Port(port) => Some(*port),
            _ => None,
        }),
        _ => None,
    })
}

/// `aa:bb:cc:dd:ee:ff`
pub(crate) fn mac_text(mac: Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The IP address of an `NDA_DST`; in a bridge-family (FDB) message the
/// parser cannot tell the family, so the length does.
fn ip_of(address: &NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn address_of(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn request(command: String, source: rtnetlink::Error) -> NetlinkError {
    NetlinkError::Request { command, source }
}
