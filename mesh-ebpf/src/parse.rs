//! Packet parsing for the programs, over a `[data, data_end)` window as the
//! verifier wants it: every read is bounds-checked against `data_end` first.

use core::mem::size_of;

use mesh_common::counters::ProtoClass;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// Pointer to a `T` at `offset` into the packet, or `None` if it would read
/// past `data_end`.
#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let ptr = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: ptr_at checked that the whole T lies inside the packet; packet
    // data has no alignment guarantee, hence the unaligned read.
    Some(unsafe { ptr.read_unaligned() })
}

/// The L4 protocol number of an Ethernet frame carrying IPv4 or IPv6, or
/// `None` for anything else. IPv6 extension headers are not walked: a packet
/// that has them reports the first extension header's number.
#[inline(always)]
pub fn l4_protocol(data: usize, data_end: usize) -> Option<u8> {
    let ethertype = u16::from_be_bytes(read::<[u8; 2]>(data, data_end, 12)?);
    match ethertype {
        ETH_P_IPV4 => read::<u8>(data, data_end, ETH_HLEN + 9),
        ETH_P_IPV6 => {
            // Make sure the whole fixed header is there before trusting it.
            ptr_at::<[u8; IPV6_HLEN]>(data, data_end, ETH_HLEN)?;
            read::<u8>(data, data_end, ETH_HLEN + 6)
        }
        _ => None,
    }
}

/// The counter class of an Ethernet frame.
#[inline(always)]
pub fn classify(data: usize, data_end: usize) -> ProtoClass {
    match l4_protocol(data, data_end) {
        Some(IPPROTO_ICMP | IPPROTO_ICMPV6) => ProtoClass::Icmp,
        Some(IPPROTO_TCP) => ProtoClass::Tcp,
        Some(IPPROTO_UDP) => ProtoClass::Udp,
        _ => ProtoClass::Other,
    }
}
