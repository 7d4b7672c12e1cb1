//! mesh's eBPF programs. Entry points are thin wrappers around `try_*`
//! functions; packet parsing lives in `mesh_common::packet`, shared with
//! the host, where it is fuzzed.
//!
//! Programs (their names are the section names the agent looks up):
//! - `xdp_count`: XDP, counts packets per protocol class and passes them on.
//! - `tc_count`: TC clsact classifier, the same counting, for links where XDP
//!   does not fit (egress, or a driver without XDP).
//! - `tc_ingress`, `tc_tunnel`, `tc_reply`, `tc_from_task`: the routing
//!   mesh (see [`lb`]).
//! - `sock_connect4`, `sock_sendmsg4`, `sock_recvmsg4`, `sock_getpeername4`
//!   and their `*6` twins (IPv4-mapped addresses on IPv6 sockets): service
//!   VIPs for tasks (see [`sock`]).
//! - `host_connect4`, `host_sendmsg4`, `host_recvmsg4`, `host_getpeername4`
//!   and their `*6` twins: the node's own connections to its published
//!   ports (see [`sock`]).
//!
//! On the host target the crate builds to a stub `main` that says how to
//! build it for real, so `cargo clippy --workspace` still checks it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod lb;
mod sock;

use sock::Family;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::PerCpuArray,
    programs::{SockAddrContext, TcContext, XdpContext},
};
use mesh_common::{
    counters::{self, Counter, Hook, ProtoClass},
    packet,
};

#[map(name = "PACKET_COUNTERS")]
static PACKET_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(counters::ENTRIES, 0);

#[xdp]
pub fn xdp_count(ctx: XdpContext) -> u32 {
    // SAFETY: [data, data_end) is the packet the kernel handed the program.
    let class = unsafe { packet::classify(ctx.data(), ctx.data_end()) };
    count(Hook::Xdp, class, (ctx.data_end() - ctx.data()) as u64);
    xdp_action::XDP_PASS
}

#[classifier]
pub fn tc_count(ctx: TcContext) -> i32 {
    // SAFETY: [data, data_end) is the packet's linear part, the program's own.
    let class = unsafe { packet::classify(ctx.data(), ctx.data_end()) };
    count(Hook::Tc, class, u64::from(ctx.len()));
    TC_ACT_OK
}

#[classifier]
pub fn tc_ingress(mut ctx: TcContext) -> i32 {
    lb::ingress(&mut ctx)
}

#[classifier]
pub fn tc_tunnel(mut ctx: TcContext) -> i32 {
    lb::tunnel(&mut ctx)
}

#[classifier]
pub fn tc_reply(mut ctx: TcContext) -> i32 {
    lb::reply(&mut ctx)
}

/// `tc_reply` on a task's veth: the same program under its own name, so
/// its per-veth links are pinned and cleaned apart from the bridge's.
#[classifier]
pub fn tc_from_task(mut ctx: TcContext) -> i32 {
    lb::reply(&mut ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_vip(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_vip(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_vip(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::to_vip(&ctx, Family::V6)
}

#[cgroup_sock_addr(connect4)]
pub fn host_connect4(ctx: SockAddrContext) -> i32 {
    sock::host_to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn host_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::host_to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn host_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::host_to_published(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn host_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::host_to_published(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn host_connect6(ctx: SockAddrContext) -> i32 {
    sock::host_to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn host_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::host_to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn host_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::host_to_published(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn host_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::host_to_published(&ctx, Family::V6)
}

#[inline(always)]
fn count(hook: Hook, class: ProtoClass, bytes: u64) {
    if let Some(counter) = PACKET_COUNTERS.get_ptr_mut(counters::index(hook, class)) {
        // SAFETY: the pointer comes from a per-CPU array lookup, so it is valid
        // and only this CPU writes it while this program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("mesh-ebpf runs in the kernel: build it with `cargo xtask build-ebpf`");
    std::process::exit(1);
}
