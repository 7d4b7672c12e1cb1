//! Packet counters kept by the observation programs (`xdp_count`, `tc_count`).
//!
//! One `PerCpuArray<Counter>` named [`MAP_NAME`]; its index is
//! [`index`]`(hook, class)`, so each hook counts each protocol class apart.

/// Name of the counters map in the eBPF object.
pub const MAP_NAME: &str = "PACKET_COUNTERS";

/// Where in the stack a packet was counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP, before the kernel allocates an skb.
    Xdp = 0,
    /// TC clsact, ingress or egress.
    Tc = 1,
}

impl Hook {
    /// Every hook, in index order.
    pub const ALL: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    /// Short lower-case name, for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// The protocol class a packet is counted under.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoClass {
    /// Anything that is not IPv4/IPv6 ICMP, TCP or UDP (ARP, truncated frames, ...).
    Other = 0,
    /// ICMP over IPv4 or ICMPv6.
    Icmp = 1,
    /// TCP over IPv4 or IPv6.
    Tcp = 2,
    /// UDP over IPv4 or IPv6.
    Udp = 3,
}

impl ProtoClass {
    /// Every class, in index order.
    pub const ALL: [ProtoClass; 4] = [ProtoClass::Other, ProtoClass::Icmp, ProtoClass::Tcp, ProtoClass::Udp];

    /// Short lower-case name, for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            ProtoClass::Other => "other",
            ProtoClass::Icmp => "icmp",
            ProtoClass::Tcp => "tcp",
            ProtoClass::Udp => "udp",
        }
    }
}

/// Number of protocol classes per hook.
pub const CLASSES: u32 = ProtoClass::ALL.len() as u32;

/// Number of entries in the counters map.
pub const ENTRIES: u32 = Hook::ALL.len() as u32 * CLASSES;

/// Map index of the counter for `class` packets seen at `hook`.
pub const fn index(hook: Hook, class: ProtoClass) -> u32 {
    hook as u32 * CLASSES + class as u32
}

/// Packets and bytes seen; one per CPU in the map, summed by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Sum of two counters, saturating rather than wrapping.
    pub const fn saturating_add(self, other: Counter) -> Counter {
        Counter {
            packets: self.packets.saturating_add(other.packets),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

// SAFETY: Counter is #[repr(C)], made only of u64s, so it has no padding and
// every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_unique() {
        let mut seen = [false; ENTRIES as usize];
        for hook in Hook::ALL {
            for class in ProtoClass::ALL {
                let i = index(hook, class) as usize;
                assert!(!seen[i], "index {i} used twice");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn counter_layout_matches_the_ebpf_side() {
        assert_eq!(core::mem::size_of::<Counter>(), 16);
        assert_eq!(core::mem::align_of::<Counter>(), 8);
    }
}
