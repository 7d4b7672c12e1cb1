//! East-west load balancing: a task's connection to a service's virtual IP
//! is sent to one of the service's tasks when the socket connects (or, for
//! unconnected UDP, per datagram), so no packet is ever translated and no
//! address needs answering for ARP. The programs sit on the cgroup holding
//! the node's tasks; sockets outside it are never touched.
//!
//! - `sock_connect4`, `sock_sendmsg4`: VIP -> a task's address ([`LB_VIPS`],
//!   the shared tables and backends; the connection tracking keeps one
//!   socket's datagrams on one task);
//! - `sock_recvmsg4`, `sock_getpeername4`: the task's address -> the VIP, so
//!   the application sees the peer it asked for;
//! - `sock_*6`: the same for IPv6 sockets whose peer is an IPv4 address
//!   mapped into IPv6 (`::ffff:A.B.C.D`), as dual-stack runtimes (Java,
//!   Node, `iperf3` without `-4`) connect to IPv4 services; other IPv6
//!   addresses are left alone.
//!
//! Node-local access to published ports: `host_*` on the cgroup2 root, for
//! sockets in the node's own network namespace only ([`LB_HOST`] holds its
//! cookie; every other namespace, tasks' included, is left alone). A
//! connection to a published port on the node's address or 127.0.0.1 goes
//! to a local task (its address and target port) or to the task's node (its
//! address, the published port; that node keeps it on its own tasks), and
//! the socket sees the address it asked for. `host_*6` do the same for
//! IPv6 sockets asking for the mapped form of those addresses.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::map,
    maps::{Array, HashMap, LruHashMap},
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::lb::{FlowKey, HostRev, ServiceValue, SockRev, SockRevKey, MAX_CONNTRACK, MAX_SERVICES};

use crate::lb::{backend_for, config, published};

#[map(name = "LB_VIPS")]
static LB_VIPS: HashMap<u32, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map(name = "LB_SOCK_REV")]
static SOCK_REV: LruHashMap<SockRevKey, SockRev> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);
#[map(name = "LB_HOST")]
static LB_HOST: Array<u64> = Array::with_max_entries(1, 0);
#[map(name = "LB_HOST_REV")]
static HOST_REV: LruHashMap<SockRevKey, HostRev> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// 127.0.0.1 as the socket address holds it.
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Let the system call go on (the cgroup hooks' verdict).
const ALLOW: i32 = 1;

/// Which socket address a program is handed.
#[derive(Clone, Copy)]
pub enum Family {
    /// An IPv4 one (`*4` hooks): `user_ip4`.
    V4,
    /// An IPv6 one (`*6` hooks): only an IPv4-mapped address
    /// (`::ffff:A.B.C.D`) is the mesh's; its last word is the IPv4 address.
    V6,
}

/// The first three words of an IPv4-mapped IPv6 address, as the socket
/// address holds them (network order).
const MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The IPv4 address `sa` names, if it names one.
#[inline(always)]
fn ipv4(sa: &bpf_sock_addr, family: Family) -> Option<u32> {
    match family {
        Family::V4 => Some(sa.user_ip4),
        Family::V6 => {
            let mapped = sa.user_ip6[0] == MAPPED_PREFIX[0]
                && sa.user_ip6[1] == MAPPED_PREFIX[1]
                && sa.user_ip6[2] == MAPPED_PREFIX[2];
            mapped.then_some(sa.user_ip6[3])
        }
    }
}

/// Makes `sa` name `addr` (mapped, for IPv6: only called on an address
/// [`ipv4`] found mapped, so the prefix is already there).
#[inline(always)]
fn set_ipv4(sa: &mut bpf_sock_addr, family: Family, addr: u32) {
    match family {
        Family::V4 => sa.user_ip4 = addr,
        Family::V6 => sa.user_ip6[3] = addr,
    }
}

/// The flow a socket's pick is tracked under: one socket, one flow, so its
/// datagrams (and a reconnect) stay on one task.
#[inline(always)]
fn socket_flow(cookie: u64, dst: u32, port: u16, proto: u8) -> FlowKey {
    FlowKey::new(cookie as u32, dst, (cookie >> 32) as u16, port, proto)
}

/// The reverse-lookup key of the peer socket address `sa` names (none
/// for an IPv6 address that is not IPv4-mapped).
#[inline(always)]
fn peer_key(ctx: &SockAddrContext, sa: &bpf_sock_addr, family: Family) -> Option<SockRevKey> {
    Some(SockRevKey {
        // SAFETY: the context is the program's own.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: ipv4(sa, family)?,
        port: sa.user_port as u16,
        pad: 0,
    })
}

/// VIP -> a task's address, for `connect()` and `sendmsg()`.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(vip) = ipv4(sa, family) else {
        return ALLOW;
    };
    // SAFETY: read-only lookup of a plain value.
    let Some(service) = (unsafe { LB_VIPS.get(vip) }) else {
        return ALLOW;
    };
    let service = *service;
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let port = sa.user_port as u16;
    let flow = socket_flow(cookie, vip, port, sa.protocol as u8);
    let Some(backend) = backend_for(&service, service.id, &flow, false, || false).map(|p| p.backend) else {
        // No task: the VIP stays, and the connection finds nobody there.
        return ALLOW;
    };
    set_ipv4(sa, family, backend.local);
    let _ = SOCK_REV.insert(
        SockRevKey {
            cookie,
            addr: backend.local,
            port,
            pad: 0,
        },
        SockRev { vip },
        0,
    );
    ALLOW
}

/// The task's address -> the VIP, for `recvmsg()` and `getpeername()`.
#[inline(always)]
pub fn to_vip(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(key) = peer_key(ctx, sa, family) else {
        return ALLOW;
    };
    // SAFETY: read-only lookup of a plain value.
    if let Some(rev) = unsafe { SOCK_REV.get(key) } {
        set_ipv4(sa, family, rev.vip);
    }
    ALLOW
}

/// Whether the socket lives in the node's own network namespace.
#[inline(always)]
fn in_node_namespace(ctx: &SockAddrContext) -> bool {
    let Some(node) = LB_HOST.get(0) else {
        return false;
    };
    // SAFETY: the context is the program's own.
    *node != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == *node
}

/// A published port on this node -> a task, for `connect()` and
/// `sendmsg()` in the node's namespace.
#[inline(always)]
pub fn host_to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(dst) = ipv4(sa, family) else {
        return ALLOW;
    };
    let (port, proto) = (sa.user_port as u16, sa.protocol as u8);
    let Some(config) = config() else {
        return ALLOW;
    };
    if dst != config.addr && dst != LOOPBACK {
        return ALLOW;
    }
    let Some(service) = published(port, proto) else {
        return ALLOW;
    };
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow = socket_flow(cookie, dst, port, proto);
    let Some(backend) = backend_for(&service, service.id, &flow, false, || false).map(|p| p.backend) else {
        return ALLOW;
    };
    let (addr, to_port) = if backend.local != 0 {
        (backend.local, service.target_port)
    } else {
        (backend.node, port)
    };
    set_ipv4(sa, family, addr);
    sa.user_port = u32::from(to_port);
    let _ = HOST_REV.insert(
        SockRevKey {
            cookie,
            addr,
            port: to_port,
            pad: 0,
        },
        HostRev {
            addr: dst,
            port,
            pad: 0,
        },
        0,
    );
    ALLOW
}

/// The task (or its node) -> the published address the socket asked
/// for, for `recvmsg()` and `getpeername()` in the node's namespace.
#[inline(always)]
pub fn host_to_published(ctx: &SockAddrContext, family: Family) -> i32 {
    if !in_node_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(key) = peer_key(ctx, sa, family) else {
        return ALLOW;
    };
    // SAFETY: read-only lookup of a plain value.
    if let Some(rev) = unsafe { HOST_REV.get(key) } {
        set_ipv4(sa, family, rev.addr);
        sa.user_port = u32::from(rev.port);
    }
    ALLOW
}
