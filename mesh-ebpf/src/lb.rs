//! The routing mesh: published ports answered on every node, load-balanced
//! to the service's tasks wherever they run (layout and flow in
//! `mesh_common::lb`).
//!
//! Three TC programs share the maps:
//! - [`ingress`] on the underlay link: a client's packet for a published port
//!   goes to a local task, or unchanged to the backend's node (by its MAC
//!   when it is on the link, else into the tunnel); a request another node
//!   on the link passed on goes to a local task; a reply coming back from
//!   such a node goes on to our client;
//! - [`tunnel`] on the routing-mesh tunnel device: the same for nodes off
//!   the link;
//! - [`reply`] on each local task's veth (host end) and on the task
//!   bridge: a task's answer to a routed connection gets the published
//!   address back and goes where the client came in, without crossing the
//!   bridge (the bridge's copy serves a task whose veth has none yet).
//!
//! Requests for a local task go straight into its namespace
//! (`bpf_redirect_peer` on its veth, from [`TASK_LINKS`]), or through the
//! bridge for a task the agent has not listed there.
//!
//! Only IPv4 without options, TCP and UDP, unfragmented, are served; every
//! other packet is left to the kernel unchanged.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_redir_neigh, bpf_tunnel_key, BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use mesh_common::lb::NODE_ON_LINK;
use mesh_common::lb::{
    Affinity, AffinityKey, Algorithm, Backend, Conntrack, FlowKey, NodeConfig, ReverseNat, ServiceKey, ServiceStats,
    ServiceValue, Table, LOCAL_TABLE, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_NODES, MAX_SERVICES, MAX_TABLES,
    MAX_TASK_LINKS, PROTO_TCP, TABLE_SIZE, VNI_REPLY, VNI_REQUEST,
};
use mesh_common::packet::{ipv4_flow, IPV4_FLOW_LEN, IP_CSUM, IP_DST, IP_SRC, L4, TCP_CSUM, UDP_CSUM};

#[map(name = "LB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map(name = "LB_TABLES")]
static TABLES: HashMap<u32, Table> = HashMap::with_max_entries(MAX_TABLES, BPF_F_NO_PREALLOC);
#[map(name = "LB_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);
#[map(name = "LB_CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, Conntrack> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);
#[map(name = "LB_REVERSE_NAT")]
static REVERSE_NAT: LruHashMap<FlowKey, ReverseNat> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);
#[map(name = "LB_AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::with_max_entries(MAX_AFFINITY, 0);
#[map(name = "LB_CONFIG")]
static CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);
#[map(name = "LB_NODES")]
static NODES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODES, BPF_F_NO_PREALLOC);
#[map(name = "LB_STATS")]
static STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
/// Per task (backend ID) on this node: packets, bytes and connections
/// toward it, whichever node the client entered by.
#[map(name = "LB_TASK_STATS")]
static BACKEND_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);
/// Local task address -> its veth's host-end index.
#[map(name = "LB_TASK_LINKS")]
static TASK_LINKS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TASK_LINKS, BPF_F_NO_PREALLOC);
#[map(name = "LB_ROUND_ROBIN")]
static ROUND_ROBIN: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[allow(
    clippy::unnecessary_cast,
    reason = "u32 in the bpf target's bindings, i32 in the host's"
)]
const OK: i32 = TC_ACT_OK as i32;
#[allow(
    clippy::unnecessary_cast,
    reason = "u32 in the bpf target's bindings, i32 in the host's"
)]
const SHOT: i32 = TC_ACT_SHOT as i32;

/// `skb->pkt_type` of a frame addressed to this host's MAC.
const PACKET_HOST: u32 = 0;
const NS_PER_S: u64 = 1_000_000_000;

/// The headers the programs act on; addresses and ports as on the wire.
struct Packet {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    len: u32,
}

impl Packet {
    fn flow(&self) -> FlowKey {
        FlowKey::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// The key the answer to this packet carries once it has left the task.
    fn reply_flow(&self, task: u32, task_port: u16) -> FlowKey {
        FlowKey::new(task, self.src, task_port, self.sport, self.proto)
    }
}

/// Reads the headers of an unfragmented IPv4 TCP/UDP packet without IP
/// options; `None` for anything else (the kernel handles those). Reads the
/// packet in place (`mesh_common::packet::ipv4_flow`), pulling the headers
/// into the linear area first if a driver left them out of it.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    if ctx.data() + IPV4_FLOW_LEN > ctx.data_end() {
        // Too short, or not linear: pull (fails for a truly short packet).
        ctx.pull_data(IPV4_FLOW_LEN as u32).ok()?;
    }
    // SAFETY: [data, data_end) is the packet's linear part, the program's own.
    let flow = unsafe { ipv4_flow(ctx.data(), ctx.data_end()) }?;
    Some(Packet {
        src: flow.src,
        dst: flow.dst,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        len: ctx.len(),
    })
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static NodeConfig> {
    CONFIG.get(0)
}

/// murmur3's finaliser over the connection (or, for affinity, the client).
#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn flow_hash(flow: &FlowKey) -> u32 {
    let ports = (u32::from(flow.sport) << 16) | u32::from(flow.dport);
    mix(mix(flow.src ^ mix(flow.dst)) ^ ports ^ u32::from(flow.proto))
}

/// A backend from a table, by the service's algorithm.
#[inline(always)]
fn pick(service: &ServiceValue, table_id: u32, flow: &FlowKey) -> Option<u32> {
    // SAFETY: map values are only read here; the agent replaces whole values.
    let table = unsafe { TABLES.get(table_id) }?;
    let count = table.count;
    if count == 0 || count > TABLE_SIZE {
        return None;
    }
    let slot = if service.algorithm == Algorithm::Random as u8 {
        // SAFETY: a helper without arguments.
        (unsafe { bpf_get_prandom_u32() }) % TABLE_SIZE
    } else if service.algorithm == Algorithm::RoundRobin as u8 {
        let counter = ROUND_ROBIN.get_ptr_mut(service.id)?;
        // SAFETY: a per-CPU slot only this CPU touches while the program runs.
        unsafe {
            *counter = (*counter).wrapping_add(1);
            *counter % count
        }
    } else if service.affinity != 0 {
        mix(flow.src) % TABLE_SIZE
    } else {
        flow_hash(flow) % TABLE_SIZE
    };
    // The compiler turns `% TABLE_SIZE` into multiplications the verifier
    // cannot bound; reading the slot back through memory keeps this check.
    // SAFETY: a read of a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) };
    if slot >= TABLE_SIZE {
        return None;
    }
    table.slots.get(slot as usize).copied()
}

/// A connection's backend, its ID, and whether the connection is new.
pub(crate) struct Picked {
    pub id: u32,
    pub backend: Backend,
    pub new: bool,
}

/// The backend of a connection: the one it already has while that backend
/// is still in service, else the client's sticky one, else a fresh pick
/// (from the local table first when `prefer_local` says so: asked only for
/// a new connection). A connection whose backend left gets a new one,
/// whose kernel resets it.
#[inline(always)]
pub(crate) fn backend_for(
    service: &ServiceValue,
    table_id: u32,
    flow: &FlowKey,
    local_only: bool,
    prefer_local: impl Fn() -> bool,
) -> Option<Picked> {
    if let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
        // SAFETY: an LRU map value; a racing CPU writes the same values.
        let ct = unsafe { &mut *ct };
        if ct.service == service.id {
            if ct.generation == service.generation {
                if !local_only || ct.copy.local != 0 {
                    return Some(Picked {
                        id: ct.backend,
                        backend: ct.copy,
                        new: false,
                    });
                }
            } else if let Some(b) = unsafe { BACKENDS.get(ct.backend) } {
                // The service changed since: is this backend still in it?
                if !local_only || b.local != 0 {
                    ct.generation = service.generation;
                    ct.copy = *b;
                    return Some(Picked {
                        id: ct.backend,
                        backend: *b,
                        new: false,
                    });
                }
            }
        }
    }
    let now = if service.affinity != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let sticky = AffinityKey {
        service: table_id,
        client: flow.src,
    };
    let mut chosen = None;
    if service.affinity != 0 {
        // SAFETY: read-only lookups of plain values.
        if let Some(a) = unsafe { AFFINITY.get(sticky) } {
            let fresh = now.saturating_sub(a.last_ns) < u64::from(service.affinity_timeout_s) * NS_PER_S;
            if fresh {
                if let Some(b) = unsafe { BACKENDS.get(a.backend) } {
                    if !local_only || b.local != 0 {
                        chosen = Some((a.backend, *b));
                    }
                }
            }
        }
    }
    if chosen.is_none() && !local_only && prefer_local() {
        if let Some(id) = pick(service, table_id | LOCAL_TABLE, flow) {
            // SAFETY: read-only lookup of a plain value.
            if let Some(b) = unsafe { BACKENDS.get(id) } {
                if b.local != 0 {
                    chosen = Some((id, *b));
                }
            }
        }
    }
    let (id, backend) = match chosen {
        Some(c) => c,
        None => {
            let id = pick(service, table_id, flow)?;
            // SAFETY: as above.
            let b = unsafe { BACKENDS.get(id) }?;
            if local_only && b.local == 0 {
                return None;
            }
            (id, *b)
        }
    };
    let _ = CONNTRACK.insert(
        flow,
        Conntrack {
            backend: id,
            service: service.id,
            generation: service.generation,
            pad: 0,
            copy: backend,
        },
        0,
    );
    if service.affinity != 0 {
        let _ = AFFINITY.insert(
            sticky,
            Affinity {
                backend: id,
                pad: 0,
                last_ns: now,
            },
            0,
        );
    }
    if let Some(stats) = STATS.get_ptr_mut(service.id) {
        // SAFETY: a per-CPU slot only this CPU touches while the program runs.
        unsafe { (*stats).connections += 1 };
    }
    Some(Picked { id, backend, new: true })
}

/// The published port `packet` is for, if any.
#[inline(always)]
fn service_of(packet: &Packet) -> Option<ServiceValue> {
    published(packet.dport, packet.proto)
}

/// The service publishing `port` (network order) for `proto`, if any.
#[inline(always)]
pub(crate) fn published(port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: 0,
        port,
        proto,
        pad: 0,
    };
    // SAFETY: read-only lookup of a plain value.
    unsafe { SERVICES.get(key) }.copied()
}

/// Whether `addr` is another swarm node.
#[inline(always)]
fn is_node(addr: u32) -> bool {
    // SAFETY: read-only lookup of a plain value.
    unsafe { NODES.get(addr) }.is_some()
}

/// Counts `packet` for service port `id`.
#[inline(always)]
fn count(id: u32, packet: &Packet) {
    if let Some(stats) = STATS.get_ptr_mut(id) {
        // SAFETY: a per-CPU slot only this CPU touches while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(packet.len);
        }
    }
}

/// Rewrites one address and port of the packet, fixing the IPv4 and L4
/// checksums (`address_at` is [`IP_SRC`] or [`IP_DST`]).
#[inline(always)]
fn rewrite(ctx: &mut TcContext, packet: &Packet, address_at: usize, old: (u32, u16), new: (u32, u16)) -> Option<()> {
    let port_at = if address_at == IP_SRC { L4 } else { L4 + 2 };
    let (csum_at, mangled) = if packet.proto == PROTO_TCP {
        (TCP_CSUM, 0)
    } else {
        (UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    if old.0 != new.0 {
        ctx.l4_csum_replace(csum_at, u64::from(old.0), u64::from(new.0), pseudo | 4)
            .ok()?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old.0), u64::from(new.0), 4)
            .ok()?;
        ctx.store(address_at, &new.0, 0).ok()?;
    }
    if old.1 != new.1 {
        ctx.l4_csum_replace(csum_at, u64::from(old.1), u64::from(new.1), mangled | 2)
            .ok()?;
        ctx.store(port_at, &new.1, 0).ok()?;
    }
    Some(())
}

/// Sends the frame through the routing-mesh tunnel to `node`.
#[inline(always)]
fn into_tunnel(ctx: &mut TcContext, config: &NodeConfig, node: u32, vni: u32) -> i32 {
    // Built in place, zeroed word by word: a zeroed value (or any run of
    // zero stores the compiler may merge, and the copy of a returned
    // value) costs a call to a `memset` subprogram per packet.
    const WORDS: usize = size_of::<bpf_tunnel_key>() / 4;
    let mut key = core::mem::MaybeUninit::<bpf_tunnel_key>::uninit();
    let key = key.as_mut_ptr();
    let words = key.cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: within the key (WORDS u32s long, 4-byte aligned);
        // volatile so the stores stay stores.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte of the key is written above (all zeroes is a
    // valid value: plain integers and unions of them); skb is the
    // program's own.
    let set = unsafe {
        (*key).tunnel_id = vni;
        (*key).__bindgen_anon_1.remote_ipv4 = u32::from_be(node);
        (*key).tunnel_ttl = 64;
        bpf_skb_set_tunnel_key(ctx.skb.skb, key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if set != 0 {
        return SHOT;
    }
    // SAFETY: a helper over plain integers.
    unsafe { bpf_redirect(config.tunnel_ifindex, 0) as i32 }
}

/// Sends the packet, unchanged, out of the underlay to `node`'s MAC
/// address (a node on the same link): the neighbour table gives the MAC.
#[inline(always)]
fn to_node(config: &NodeConfig, node: u32) -> i32 {
    let mut params = bpf_redir_neigh {
        nh_family: 2, // AF_INET
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: node },
    };
    // SAFETY: the parameter block is a local of the size passed.
    unsafe { bpf_redirect_neigh(config.ifindex, &mut params, size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
}

/// Whether `node` is another node on this node's link.
#[inline(always)]
fn on_link(node: u32) -> bool {
    // SAFETY: read-only lookup of a plain value.
    unsafe { NODES.get(node) }.is_some_and(|flags| flags & NODE_ON_LINK != 0)
}

/// Sends the packet out of `ifindex`, the kernel's FIB and neighbour table
/// choosing the next hop and its MAC address.
#[inline(always)]
fn out_via(ifindex: u32) -> i32 {
    // SAFETY: a null parameter block asks the kernel to do the route lookup.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Hands a routed connection's packet to a task on this node, and records
/// how its replies are put back.
#[inline(always)]
fn to_local_task(
    ctx: &mut TcContext,
    config: &NodeConfig,
    packet: &Packet,
    service: &ServiceValue,
    picked: &Picked,
    entry: u32,
    direct: bool,
) -> i32 {
    let task = picked.backend.local;
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(picked.id) {
        // SAFETY: a per-CPU value only this CPU touches while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(packet.len);
            (*stats).connections += u64::from(picked.new);
        }
    } else {
        let first = ServiceStats {
            packets: 1,
            bytes: u64::from(packet.len),
            connections: u64::from(picked.new),
        };
        let _ = BACKEND_STATS.insert(picked.id, first, 0);
    }
    let reverse = ReverseNat {
        addr: packet.dst,
        port: packet.dport,
        direct: u16::from(direct),
        entry,
        service: service.id,
    };
    // Written when the connection starts (or its entry went out of the
    // LRU): an update per packet would cost a locked LRU write each time.
    let reply = packet.reply_flow(task, service.target_port);
    // SAFETY: read-only lookup of a plain value.
    let known = !picked.new && unsafe { REVERSE_NAT.get(reply) }.is_some_and(|r| *r == reverse);
    if !known && REVERSE_NAT.insert(reply, reverse, 0).is_err() {
        return SHOT;
    }
    if rewrite(
        ctx,
        packet,
        IP_DST,
        (packet.dst, packet.dport),
        (task, service.target_port),
    )
    .is_none()
    {
        return SHOT;
    }
    into_task(ctx, config, task)
}

/// Hands a packet already addressed to local task `task` over: straight
/// into the task's namespace through its veth when the agent listed it
/// (no bridge, no backlog queue), else through the task bridge.
#[inline(always)]
fn into_task(ctx: &mut TcContext, config: &NodeConfig, task: u32) -> i32 {
    // SAFETY: read-only lookup of a plain value.
    let Some(link) = (unsafe { TASK_LINKS.get(task) }).copied() else {
        return out_via(config.bridge_ifindex);
    };
    // The task's stack drops a frame not for this host; one out of the
    // tunnel was addressed to the tunnel device's peer.
    // SAFETY: the program's own __sk_buff.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST && ctx.change_type(PACKET_HOST).is_err() {
        return out_via(config.bridge_ifindex);
    }
    // SAFETY: a helper over plain integers.
    unsafe { bpf_redirect_peer(link, 0) as i32 }
}

/// `tc_ingress`: the underlay link's ingress. Three kinds of packet are
/// ours: a client's for a published port on this node; one another node
/// on this link passed on unchanged for a task here (it still names that
/// node and the published port); and a task's reply coming back from such
/// a node, already carrying our address, for our client.
#[inline(always)]
pub fn ingress(ctx: &mut TcContext) -> i32 {
    let Some(packet) = parse(ctx) else {
        return OK;
    };
    let Some(config) = config() else {
        return OK;
    };
    if packet.dst != config.addr {
        return from_peer(ctx, config, &packet);
    }
    let Some(service) = service_of(&packet) else {
        return OK;
    };
    // Another node's own connection was balanced there already (node-local
    // access, sock.rs): a task here takes it when there is one.
    let Some(picked) = backend_for(&service, service.id, &packet.flow(), false, || is_node(packet.src)) else {
        // No task can take it: refuse rather than let the node answer for a port it does not serve.
        return SHOT;
    };
    count(service.id, &packet);
    let backend = picked.backend;
    if backend.local != 0 {
        to_local_task(ctx, config, &packet, &service, &picked, 0, false)
    } else if backend.route & NODE_ON_LINK != 0 {
        to_node(config, backend.node)
    } else {
        into_tunnel(ctx, config, backend.node, VNI_REQUEST)
    }
}

/// A packet on the underlay not addressed to this node: a request another
/// node on the link passed on, or a reply coming back to be sent on.
#[inline(always)]
fn from_peer(ctx: &mut TcContext, config: &NodeConfig, packet: &Packet) -> i32 {
    // Only frames sent to this node's MAC: a bridge floods frames for
    // others, and those are theirs to serve.
    // SAFETY: the program's own __sk_buff.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return OK;
    }
    if packet.src == config.addr {
        // A task's reply through another node, for our client.
        if !is_tracked_reply(packet) {
            return OK;
        }
        return out_via(config.ifindex);
    }
    if !on_link(packet.dst) {
        return OK;
    }
    serve_here(ctx, config, packet, packet.dst, true, OK)
}

/// Whether `packet`, carrying this node's address as its source, answers
/// a connection this node tracks: only then is it a task's reply to send
/// on to our client. Nothing else may borrow our address, or anyone who
/// can reach a node could have it send what they like in its name.
#[inline(always)]
fn is_tracked_reply(packet: &Packet) -> bool {
    let ours = FlowKey::new(packet.dst, packet.src, packet.dport, packet.sport, packet.proto);
    // SAFETY: read-only lookup of a plain value.
    unsafe { CONNTRACK.get(ours) }.is_some()
}

/// A request node `entry` passed on (`direct`: by MAC, else through the
/// tunnel): one of this node's tasks takes it. `miss` is the verdict for
/// a port no service publishes.
#[inline(always)]
fn serve_here(ctx: &mut TcContext, config: &NodeConfig, packet: &Packet, entry: u32, direct: bool, miss: i32) -> i32 {
    let Some(service) = service_of(packet) else {
        return miss;
    };
    let Some(picked) = backend_for(&service, service.id | LOCAL_TABLE, &packet.flow(), true, || false) else {
        return SHOT;
    };
    count(service.id, packet);
    to_local_task(ctx, config, packet, &service, &picked, entry, direct)
}

/// `tc_tunnel`: the routing-mesh tunnel device's ingress.
#[inline(always)]
pub fn tunnel(ctx: &mut TcContext) -> i32 {
    // The helper writes the whole key (zeroes on failure): no need to zero it first.
    let mut key = core::mem::MaybeUninit::<bpf_tunnel_key>::uninit();
    // SAFETY: the key is a local of the size passed.
    let got = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, key.as_mut_ptr(), size_of::<bpf_tunnel_key>() as u32, 0) };
    if got != 0 {
        return SHOT;
    }
    // SAFETY: filled by the helper, which succeeded.
    let key = unsafe { key.assume_init() };
    // SAFETY: the kernel filled the IPv4 member (the device is IPv4).
    let from = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be();
    // SAFETY: read-only lookup.
    if unsafe { NODES.get(from) }.is_none() {
        return SHOT;
    }
    let (Some(packet), Some(config)) = (parse(ctx), config()) else {
        return SHOT;
    };
    if key.tunnel_id == VNI_REPLY {
        // Our client's answer, already carrying our address: out it goes,
        // if it answers a connection we passed on (the outer source only
        // says a node sent it, and that can be forged).
        if packet.src != config.addr || !is_tracked_reply(&packet) {
            return SHOT;
        }
        return out_via(config.ifindex);
    }
    if key.tunnel_id != VNI_REQUEST {
        return SHOT;
    }
    serve_here(ctx, config, &packet, from, false, SHOT)
}

/// `tc_reply` and `tc_from_task`: the task bridge's ingress and each local
/// task veth's (host end): what tasks send toward the node.
#[inline(always)]
pub fn reply(ctx: &mut TcContext) -> i32 {
    let Some(packet) = parse(ctx) else {
        return OK;
    };
    // SAFETY: read-only lookup of a plain value.
    let Some(reverse) = (unsafe { REVERSE_NAT.get(packet.flow()) }) else {
        return OK;
    };
    let reverse = *reverse;
    let Some(config) = config() else {
        return OK;
    };
    if rewrite(
        ctx,
        &packet,
        IP_SRC,
        (packet.src, packet.sport),
        (reverse.addr, reverse.port),
    )
    .is_none()
    {
        return SHOT;
    }
    count(reverse.service, &packet);
    if reverse.entry == 0 {
        out_via(config.ifindex)
    } else if reverse.direct != 0 {
        to_node(config, reverse.entry)
    } else {
        into_tunnel(ctx, config, reverse.entry, VNI_REPLY)
    }
}
