//! Links and addresses through rtnetlink (route netlink), in the calling
//! thread's network namespace. Each request's doc names the `ip` command it
//! equals.
//!
//! A [`Netlink`] handle is bound to the namespace its socket was opened in,
//! so it is opened with [`Netlink::run`] on the thread that entered it.

use std::{future::Future, net::IpAddr, os::fd::AsRawFd, os::fd::BorrowedFd};

use futures::TryStreamExt;
use rtnetlink::{
    packet_route::link::{InfoData, InfoVeth, LinkMessage},
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
};

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

    /// `ip link add NAME type veth peer name PEER [netns NS]`: the peer is
    /// created straight inside `peer_netns` when given.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), NetlinkError> {
        let mut peer_message = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
        if let Some(ns) = peer_netns {
            peer_message = peer_message.setns_by_fd(ns.as_raw_fd());
        }
        let message = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())))
            .build();
        let netns = if peer_netns.is_some() { " netns ..." } else { "" };
        self.add_link(message, format!("ip link add {name} type veth peer name {peer}{netns}"))
            .await
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

    /// `ip route add default via GATEWAY`
    pub async fn add_default_route(&self, gateway: std::net::Ipv4Addr) -> Result<(), NetlinkError> {
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
    pub async fn has_address(&self, name: &str, address: IpAddr) -> Result<bool, NetlinkError> {
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
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
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

fn request(command: String, source: rtnetlink::Error) -> NetlinkError {
    NetlinkError::Request { command, source }
}
