//! Packet fixtures: Ethernet frames built byte by byte, with correct
//! lengths and checksums, for BPF_PROG_TEST_RUN and raw-socket tests.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Fixed MACs: fixtures compare byte for byte, so nothing is random.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An Ethernet header followed by `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 header (no options, TTL 64, DF) followed by `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("reason: fixtures are small");
    let mut header = [0u8; 20];
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header[6] = 0x40;
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&header]);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    [&header[..], payload].concat()
}

/// An IPv6 header (hop limit 64) followed by `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 40];
    header[0] = 0x60;
    let len = u16::try_from(payload.len()).expect("reason: fixtures are small");
    header[4..6].copy_from_slice(&len.to_be_bytes());
    header[6] = next_header;
    header[7] = 64;
    header[8..24].copy_from_slice(&src.octets());
    header[24..40].copy_from_slice(&dst.octets());
    [&header[..], payload].concat()
}

/// A UDP datagram over IPv4, checksummed, in an Ethernet frame.
pub fn udp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), data: &[u8]) -> Vec<u8> {
    let segment = l4_with_checksum(
        udp_header(src.1, dst.1, data),
        6,
        &pseudo4(src.0, dst.0, IPPROTO_UDP, data.len() + 8),
    );
    ethernet(ETH_P_IPV4, &ipv4(src.0, dst.0, IPPROTO_UDP, &segment))
}

/// A UDP datagram over IPv6, checksummed, in an Ethernet frame.
pub fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), data: &[u8]) -> Vec<u8> {
    let segment = l4_with_checksum(
        udp_header(src.1, dst.1, data),
        6,
        &pseudo6(src.0, dst.0, IPPROTO_UDP, data.len() + 8),
    );
    ethernet(ETH_P_IPV6, &ipv6(src.0, dst.0, IPPROTO_UDP, &segment))
}

/// A TCP SYN over IPv4 (no options), checksummed, in an Ethernet frame.
pub fn tcp4_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32) -> Vec<u8> {
    tcp4(src, dst, seq, TCP_SYN)
}

/// TCP flags.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment over IPv4 (no options, no data) with `flags`,
/// checksummed, in an Ethernet frame.
pub fn tcp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32, flags: u8) -> Vec<u8> {
    let mut header = vec![0u8; 20];
    header[0..2].copy_from_slice(&src.1.to_be_bytes());
    header[2..4].copy_from_slice(&dst.1.to_be_bytes());
    header[4..8].copy_from_slice(&seq.to_be_bytes());
    header[12] = 5 << 4;
    header[13] = flags;
    header[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let segment = l4_with_checksum(header, 16, &pseudo4(src.0, dst.0, IPPROTO_TCP, 20));
    ethernet(ETH_P_IPV4, &ipv4(src.0, dst.0, IPPROTO_TCP, &segment))
}

/// An ICMP echo request over IPv4, in an Ethernet frame.
pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut message = vec![8, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(b"mesh-ping");
    let message = l4_with_checksum(message, 2, &[]);
    ethernet(ETH_P_IPV4, &ipv4(src, dst, IPPROTO_ICMP, &message))
}

/// An ARP request for `target` from `sender`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&SRC_MAC);
    arp.extend_from_slice(&sender.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet(ETH_P_ARP, &arp)
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_header(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).expect("reason: fixtures are small");
    let mut segment = Vec::with_capacity(8 + data.len());
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    segment.extend_from_slice(&len.to_be_bytes());
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(data);
    segment
}

/// Writes the checksum of `pseudo` + `segment` at `at` in `segment`.
fn l4_with_checksum(mut segment: Vec<u8>, at: usize, pseudo: &[u8]) -> Vec<u8> {
    let sum = checksum(&[pseudo, &segment]);
    segment[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    segment
}

fn pseudo4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let len = u16::try_from(len).expect("reason: fixtures are small");
    [&src.octets()[..], &dst.octets(), &[0, protocol], &len.to_be_bytes()].concat()
}

fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> Vec<u8> {
    let len = u32::try_from(len).expect("reason: fixtures are small");
    [
        &src.octets()[..],
        &dst.octets(),
        &len.to_be_bytes(),
        &[0, 0, 0, next_header],
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let frame = udp4(
            (Ipv4Addr::new(192, 0, 2, 1), 1000),
            (Ipv4Addr::new(192, 0, 2, 2), 53),
            b"hi",
        );
        assert_eq!(checksum(&[&frame[14..34]]), 0, "header checksum must verify");
        assert_eq!(frame.len(), 14 + 20 + 8 + 2);
    }

    #[test]
    fn udp_checksum_verifies_to_zero_with_the_pseudo_header() {
        let (src, dst) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let frame = udp4((src, 1000), (dst, 53), b"odd");
        assert_eq!(checksum(&[&pseudo4(src, dst, IPPROTO_UDP, 11), &frame[34..]]), 0);
    }

    #[test]
    fn known_checksum_from_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2, so the checksum is !0xddf2.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), !0xddf2);
    }
}
