//! The load-balancing maps shared by the routing-mesh programs (`tc_ingress`
//! on the node's underlay link, `tc_tunnel` on its tunnel device, `tc_reply`
//! on the task bridge, and the `sock_*` programs for VIPs) and the agent.
//!
//! Addresses and ports are kept exactly as they sit in the packet (network
//! byte order), so the programs compare and copy them without swapping; the
//! agent converts with `u32::from_ne_bytes(ip.octets())` and
//! `port.to_be()`.
//!
//! How a published port is served (see ARCHITECTURE.md, "The routing mesh"):
//! the entry node looks the port up in [`SERVICES_MAP`], picks a backend
//! from the service's [`Table`] (Maglev, random or round-robin), remembers
//! the choice in [`CONNTRACK_MAP`], and either rewrites the destination to
//! a local task or sends the packet, unchanged, to the backend's node: as
//! it is, to that node's MAC address, when the node is on the same link
//! ([`NODE_ON_LINK`]), else through the node's routing-mesh tunnel (a
//! metadata-mode VXLAN device, VNI [`VNI_REQUEST`]). Either way the packet
//! still names the entry node and the published port, so the backend's
//! node picks one of its own tasks and records a [`ReverseNat`]: the
//! task's reply leaves with the published address as its source and goes
//! back the way the request came (to the entry node's MAC, or through the
//! tunnel with VNI [`VNI_REPLY`]), and the entry node sends it to the
//! client. The client address is never rewritten: the task sees who
//! connected.

/// Maglev lookup table size: prime, and about 100 times the backends a
/// service is expected to have, so each backend's share is within ~1% of
/// the ideal for up to 10 backends (Maglev paper, section 3.4). 4 KiB per
/// table.
pub const TABLE_SIZE: u32 = 1021;

/// Map names in the eBPF object.
pub const SERVICES_MAP: &str = "LB_SERVICES";
pub const TABLES_MAP: &str = "LB_TABLES";
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
pub const CONNTRACK_MAP: &str = "LB_CONNTRACK";
pub const REVERSE_NAT_MAP: &str = "LB_REVERSE_NAT";
pub const AFFINITY_MAP: &str = "LB_AFFINITY";
pub const CONFIG_MAP: &str = "LB_CONFIG";
pub const NODES_MAP: &str = "LB_NODES";
pub const RR_MAP: &str = "LB_ROUND_ROBIN";
pub const VIPS_MAP: &str = "LB_VIPS";
pub const SOCK_REV_MAP: &str = "LB_SOCK_REV";
/// The node's own network namespace cookie (one slot; 0: node-local
/// access to published ports is off).
pub const HOST_MAP: &str = "LB_HOST";
pub const HOST_REV_MAP: &str = "LB_HOST_REV";
/// Local task address (as on the wire) -> the index of its veth's host
/// end: packets for the task go straight into its namespace
/// (`bpf_redirect_peer`) instead of through the task bridge.
pub const TASK_LINKS_MAP: &str = "LB_TASK_LINKS";

/// The maps a restarted agent takes over (pinned on its bpffs).
pub const PINNED_MAPS: [&str; 16] = [
    BACKEND_STATS_MAP,
    SERVICES_MAP,
    TABLES_MAP,
    BACKENDS_MAP,
    CONNTRACK_MAP,
    REVERSE_NAT_MAP,
    AFFINITY_MAP,
    CONFIG_MAP,
    STATS_MAP,
    NODES_MAP,
    RR_MAP,
    VIPS_MAP,
    SOCK_REV_MAP,
    HOST_MAP,
    HOST_REV_MAP,
    TASK_LINKS_MAP,
];

/// A [`NODES_MAP`] value bit: the node is on this node's underlay link, so
/// packets go to it as they are, by its MAC address (no tunnel).
pub const NODE_ON_LINK: u32 = 1;
/// Every other node is reached through the tunnel.
pub const NODE_TUNNEL: u32 = 0;

/// Tunnel VNIs: a client's packet on its way to a backend's node, and a
/// task's reply on its way back to the node the client reached.
pub const VNI_REQUEST: u32 = 1;
pub const VNI_REPLY: u32 = 2;
pub const STATS_MAP: &str = "LB_STATS";
pub const BACKEND_STATS_MAP: &str = "LB_TASK_STATS";

/// Capacities.
/// Service ports (published ports and VIP ports) a node can serve.
pub const MAX_SERVICES: u32 = 16_384;
/// Two tables per service port: the whole service, and this node's tasks.
/// Allocated as used (4 KiB each), not up front.
pub const MAX_TABLES: u32 = 2 * MAX_SERVICES;
pub const MAX_BACKENDS: u32 = 131_072;
/// LRU maps are allocated whole when the agent starts: 64 Ki connections
/// is about 5 MiB per map.
pub const MAX_CONNTRACK: u32 = 65_536;
pub const MAX_AFFINITY: u32 = 16_384;
/// Other nodes whose tunnelled packets are accepted.
pub const MAX_NODES: u32 = 16_384;
/// Tasks on one node (a /16 node-local pool holds 65,534).
pub const MAX_TASK_LINKS: u32 = 65_536;

/// The bit that marks a table ID as "this node's tasks only".
pub const LOCAL_TABLE: u32 = 1 << 31;

/// IP protocol numbers the programs serve.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A published port (`addr` 0: any of this node's addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// How backends are picked.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Consistent hashing of the connection over the Maglev table.
    Maglev = 0,
    /// A random slot of the table.
    Random = 1,
    /// The next backend, per CPU.
    RoundRobin = 2,
}

/// What a published port leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Its table ID (also its stats index); the local table is `id | LOCAL_TABLE`.
    pub id: u32,
    /// The port tasks listen on.
    pub target_port: u16,
    /// [`Algorithm`] as u8.
    pub algorithm: u8,
    /// 1: keep a client on one backend ([`AFFINITY_MAP`]).
    pub affinity: u8,
    /// How long a client stays with its backend without traffic, seconds.
    pub affinity_timeout_s: u32,
    /// Changes whenever the service's set of backends does: a tracked
    /// connection of the same generation trusts its copy of the backend,
    /// an older one checks the backend is still there.
    pub generation: u32,
}

/// A service's backends: `count` of them, spread over [`TABLE_SIZE`] slots.
/// Replaced whole by the agent (a hash-map update swaps the value under
/// RCU), so the programs never see a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    pub count: u32,
    /// Backend IDs ([`BACKENDS_MAP`]); every slot is filled when count > 0.
    pub slots: [u32; TABLE_SIZE as usize],
}

impl Default for Table {
    fn default() -> Self {
        Table {
            count: 0,
            slots: [0; TABLE_SIZE as usize],
        }
    }
}

/// One task behind a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// The underlay address of the node it runs on.
    pub node: u32,
    /// Its address on this node's task bridge when it runs here, else 0.
    pub local: u32,
    /// How its node is reached ([`NODE_ON_LINK`] or [`NODE_TUNNEL`]), kept
    /// here so the hot path needs no node lookup.
    pub route: u32,
}

/// A connection, as its packets name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl FlowKey {
    /// A key with its padding zeroed, built as four whole words: a
    /// `pad: [0; 3]` literal costs the eBPF programs a call to a `memset`
    /// subprogram on every packet.
    #[inline(always)]
    pub fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
        #[cfg(target_endian = "little")]
        let words = [src, dst, u32::from(sport) | (u32::from(dport) << 16), u32::from(proto)];
        #[cfg(target_endian = "big")]
        let words = [
            src,
            dst,
            (u32::from(sport) << 16) | u32::from(dport),
            u32::from(proto) << 24,
        ];
        // SAFETY: FlowKey is repr(C): four u32's worth (16 bytes, aligned
        // to 4, no padding the compiler adds), and every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }
}

/// Which backend a connection went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub backend: u32,
    pub service: u32,
    /// The service's generation when the backend was last known to be in it.
    pub generation: u32,
    pub pad: u32,
    /// A copy of the backend, so a tracked packet needs no backend lookup.
    pub copy: Backend,
}

/// How a local task's reply is put back: its source becomes the published
/// address and port, and it goes to `entry` (the node the client reached;
/// 0: this node) before the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseNat {
    pub addr: u32,
    pub port: u16,
    /// 1: the request came straight from `entry` (on-link), 0: through the tunnel.
    pub direct: u16,
    pub entry: u32,
    pub service: u32,
}

/// A client kept on one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: u32,
    pub client: u32,
}

/// Its backend and when it was last used (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend: u32,
    pub pad: u32,
    pub last_ns: u64,
}

/// This node, as the programs need it (index 0 of [`CONFIG_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Its underlay address: published ports answer there, tunnels start there.
    pub addr: u32,
    /// The underlay link's index (replies to clients leave by it).
    pub ifindex: u32,
    /// The routing-mesh tunnel device's index.
    pub tunnel_ifindex: u32,
    /// The task bridge's index (packets for local tasks leave by it).
    pub bridge_ifindex: u32,
}

/// Per-service-port counters, per CPU, indexed by the service's table ID.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets this node's routing mesh handled for the port, both ways
    /// (a connection entering on one node and served on another counts
    /// on both).
    pub packets: u64,
    pub bytes: u64,
    /// Connections this node picked a backend for.
    pub connections: u64,
}

/// A task socket's real peer after a VIP was rewritten to it (the socket
/// programs put the VIP back where the task reads its peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// The VIP a socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    pub vip: u32,
}

/// The published address a node-local socket asked for, before
/// `host_connect4` sent it to a task ([`HOST_REV_MAP`], keyed by the
/// socket and the address it was given).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostRev {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: #[repr(C)] plain integers with explicit padding fields,
            // so every byte pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        ServiceKey,
        ServiceValue,
        Table,
        Backend,
        FlowKey,
        Conntrack,
        ReverseNat,
        AffinityKey,
        Affinity,
        NodeConfig,
        ServiceStats,
        SockRevKey,
        SockRev,
        HostRev
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_key_built_from_words_is_the_one_the_fields_make() {
        let literal = FlowKey {
            src: 0x0102_0304,
            dst: 0x0a0b_0c0d,
            sport: 0x1f90,
            dport: 0xabcd,
            proto: PROTO_UDP,
            pad: [0; 3],
        };
        assert_eq!(
            FlowKey::new(0x0102_0304, 0x0a0b_0c0d, 0x1f90, 0xabcd, PROTO_UDP),
            literal
        );
    }
}
