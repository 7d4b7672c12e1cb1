//! Packet parsing shared by the eBPF programs and the host: every read is
//! bounds-checked against `data_end` first, in the shape the verifier
//! accepts (a constant offset, one comparison with `data_end`, then the
//! read). The same code is compiled into `mesh-ebpf` and fuzzed on the host
//! (`fuzz/fuzz_targets/packet.rs`), where `[data, data_end)` is a slice.
//!
//! Windows are given as addresses (`ctx.data()`, `ctx.data_end()`), as the
//! programs' contexts hand them out; the functions are `unsafe` because
//! they read whatever memory the window names.

use core::mem::size_of;

use crate::counters::ProtoClass;
use crate::lb::{PROTO_TCP, PROTO_UDP};

/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// IPv4's EtherType.
pub const ETH_P_IPV4: u16 = 0x0800;
/// IPv6's EtherType.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6's fixed header.
pub const IPV6_HLEN: usize = 40;
/// Where the IPv4 header checksum of an Ethernet frame is.
pub const IP_CSUM: usize = ETH_HLEN + 10;
/// Where the IPv4 source address is.
pub const IP_SRC: usize = ETH_HLEN + 12;
/// Where the IPv4 destination address is.
pub const IP_DST: usize = ETH_HLEN + 16;
/// Where the L4 header starts after an IPv4 header without options.
pub const L4: usize = ETH_HLEN + 20;
/// Where the TCP checksum is (IPv4 without options).
pub const TCP_CSUM: usize = L4 + 16;
/// Where the UDP checksum is (IPv4 without options).
pub const UDP_CSUM: usize = L4 + 6;
/// The bytes [`ipv4_flow`] reads: Ethernet, IPv4 without options, the ports.
pub const IPV4_FLOW_LEN: usize = L4 + 4;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Pointer to a `T` at `offset` into the window, or `None` if it would
/// read past `data_end`.
#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

/// # Safety
/// `[data, data_end)` must be readable.
// SAFETY: sound for any window the caller vouches for: the only read is
// behind ptr_at's bounds check.
#[inline(always)]
unsafe fn read<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let ptr = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: ptr_at checked that the whole T lies inside the window, which
    // the caller vouches for; packet data has no alignment guarantee, hence
    // the unaligned read.
    Some(unsafe { ptr.read_unaligned() })
}

/// The L4 protocol number of an Ethernet frame carrying IPv4 or IPv6, or
/// `None` for anything else. IPv6 extension headers are not walked: a packet
/// that has them reports the first extension header's number.
///
/// # Safety
/// `[data, data_end)` must be readable (a program's packet, or a slice).
// SAFETY: every read goes through `read`, which checks it against data_end.
#[inline(always)]
pub unsafe fn l4_protocol(data: usize, data_end: usize) -> Option<u8> {
    // SAFETY: the caller vouches for the window; `read` checks the offset.
    let ethertype = u16::from_be_bytes(unsafe { read::<[u8; 2]>(data, data_end, 12) }?);
    match ethertype {
        // SAFETY: as above.
        ETH_P_IPV4 => unsafe { read::<u8>(data, data_end, ETH_HLEN + 9) },
        ETH_P_IPV6 => {
            // Make sure the whole fixed header is there before trusting it.
            ptr_at::<[u8; IPV6_HLEN]>(data, data_end, ETH_HLEN)?;
            // SAFETY: as above.
            unsafe { read::<u8>(data, data_end, ETH_HLEN + 6) }
        }
        _ => None,
    }
}

/// The counter class of an Ethernet frame.
///
/// # Safety
/// `[data, data_end)` must be readable (a program's packet, or a slice).
// SAFETY: reads nothing itself; passes the caller's window on.
#[inline(always)]
pub unsafe fn classify(data: usize, data_end: usize) -> ProtoClass {
    // SAFETY: the caller's window, passed on.
    match unsafe { l4_protocol(data, data_end) } {
        Some(IPPROTO_ICMP | IPPROTO_ICMPV6) => ProtoClass::Icmp,
        Some(PROTO_TCP) => ProtoClass::Tcp,
        Some(PROTO_UDP) => ProtoClass::Udp,
        _ => ProtoClass::Other,
    }
}

/// The headers the routing mesh acts on; addresses and ports as on the
/// wire (network order kept in memory order, as the maps hold them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Flow {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// The headers of an unfragmented IPv4 TCP/UDP packet without IP options
/// in an Ethernet frame; `None` for anything else (the kernel handles
/// those) or a window shorter than [`IPV4_FLOW_LEN`].
///
/// # Safety
/// `[data, data_end)` must be readable (a program's packet, or a slice).
// SAFETY: one length check against data_end covers every read it makes.
#[inline(always)]
pub unsafe fn ipv4_flow(data: usize, data_end: usize) -> Option<Ipv4Flow> {
    if data + IPV4_FLOW_LEN > data_end {
        return None;
    }
    // SAFETY: the check above covers every read below (all end within
    // IPV4_FLOW_LEN) and the caller vouches for the window; packet data
    // has no alignment guarantee, hence the unaligned reads.
    unsafe {
        let ethertype = ((data + 12) as *const u16).read_unaligned();
        if ethertype != ETH_P_IPV4.to_be() {
            return None;
        }
        let header = ((data + ETH_HLEN) as *const [u8; 20]).read_unaligned();
        if header[0] != 0x45 {
            return None;
        }
        // More-fragments flag or a fragment offset: later fragments carry no ports.
        if (header[6] & 0x3f) != 0 || header[7] != 0 {
            return None;
        }
        let proto = header[9];
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let ports = ((data + L4) as *const [u16; 2]).read_unaligned();
        Some(Ipv4Flow {
            src: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
            dst: u32::from_ne_bytes([header[16], header[17], header[18], header[19]]),
            sport: ports[0],
            dport: ports[1],
            proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(bytes: &[u8]) -> (usize, usize) {
        let data = bytes.as_ptr() as usize;
        (data, data + bytes.len())
    }

    /// Ethernet + IPv4 (no options) + ports 1234 -> 80.
    fn tcp_frame() -> [u8; IPV4_FLOW_LEN] {
        let mut f = [0u8; IPV4_FLOW_LEN];
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        f[ETH_HLEN] = 0x45;
        f[ETH_HLEN + 9] = PROTO_TCP;
        f[IP_SRC..IP_SRC + 4].copy_from_slice(&[10, 0, 0, 1]);
        f[IP_DST..IP_DST + 4].copy_from_slice(&[10, 0, 0, 2]);
        f[L4..L4 + 2].copy_from_slice(&1234u16.to_be_bytes());
        f[L4 + 2..L4 + 4].copy_from_slice(&80u16.to_be_bytes());
        f
    }

    #[test]
    fn reads_an_ipv4_flow_as_on_the_wire() {
        let frame = tcp_frame();
        let (data, end) = window(&frame);
        // SAFETY: the window is `frame`.
        let flow = unsafe { ipv4_flow(data, end) }.unwrap();
        assert_eq!(flow.src, u32::from_ne_bytes([10, 0, 0, 1]));
        assert_eq!(flow.dst, u32::from_ne_bytes([10, 0, 0, 2]));
        assert_eq!((flow.sport, flow.dport), (1234u16.to_be(), 80u16.to_be()));
        // SAFETY: as above.
        assert_eq!(unsafe { classify(data, end) }, ProtoClass::Tcp);
        // One byte short of the ports: nothing, and nothing read past the end.
        // SAFETY: a shorter window of the same frame.
        assert_eq!(unsafe { ipv4_flow(data, end - 1) }, None);
    }

    #[test]
    fn fragments_options_and_other_protocols_are_left_alone() {
        for (at, value) in [
            (ETH_HLEN, 0x46),
            (ETH_HLEN + 6, 0x20),
            (ETH_HLEN + 7, 1),
            (ETH_HLEN + 9, 1),
        ] {
            let mut frame = tcp_frame();
            frame[at] = value;
            let (data, end) = window(&frame);
            // SAFETY: the window is `frame`.
            assert_eq!(unsafe { ipv4_flow(data, end) }, None, "byte {at} = {value:#x}");
        }
    }

    #[test]
    fn ipv6_needs_its_whole_fixed_header() {
        let mut frame = [0u8; ETH_HLEN + IPV6_HLEN];
        frame[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        frame[ETH_HLEN + 6] = PROTO_UDP;
        let (data, end) = window(&frame);
        // SAFETY: the window is `frame`, or a prefix of it.
        unsafe {
            assert_eq!(classify(data, end), ProtoClass::Udp);
            assert_eq!(classify(data, end - 1), ProtoClass::Other);
        }
    }
}
