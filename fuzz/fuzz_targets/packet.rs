//! Frames as the eBPF programs see them, through the very parsing code
//! they run (`mesh_common::packet`, compiled here for the host): the input
//! is the `[data, data_end)` window.
//!
//! Asserts: no read leaves the window (AddressSanitizer reports any: each
//! window is an allocation of exactly its size; the input and every
//! shorter prefix that ends inside the headers are tried), and the results agree
//! with a plain slice-indexing reading of the same bytes: the protocol
//! class, and a flow only for an unfragmented IPv4 TCP/UDP packet without
//! options whose ports lie inside the window, with its fields at their
//! offsets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::{
    counters::ProtoClass,
    packet::{classify, ipv4_flow, Ipv4Flow, ETH_HLEN, IPV4_FLOW_LEN, IPV6_HLEN, IP_DST, IP_SRC, L4},
};

/// The L4 protocol as a reader of the RFCs would take it from the slice.
fn expected_l4(frame: &[u8]) -> Option<u8> {
    match u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?) {
        0x0800 => frame.get(ETH_HLEN + 9).copied(),
        0x86dd if frame.len() >= ETH_HLEN + IPV6_HLEN => frame.get(ETH_HLEN + 6).copied(),
        _ => None,
    }
}

fn expected_class(frame: &[u8]) -> ProtoClass {
    match expected_l4(frame) {
        Some(1 | 58) => ProtoClass::Icmp,
        Some(6) => ProtoClass::Tcp,
        Some(17) => ProtoClass::Udp,
        _ => ProtoClass::Other,
    }
}

fn expected_flow(frame: &[u8]) -> Option<Ipv4Flow> {
    let headers = frame.get(..IPV4_FLOW_LEN)?;
    let ip = &headers[ETH_HLEN..L4];
    let unfragmented = ip[6] & 0x3f == 0 && ip[7] == 0;
    let ours = headers[12..14] == [0x08, 0x00] && ip[0] == 0x45 && unfragmented && matches!(ip[9], 6 | 17);
    let word = |at: usize| u32::from_ne_bytes(headers[at..at + 4].try_into().expect("4 bytes"));
    let half = |at: usize| u16::from_ne_bytes(headers[at..at + 2].try_into().expect("2 bytes"));
    ours.then(|| Ipv4Flow {
        src: word(IP_SRC),
        dst: word(IP_DST),
        sport: half(L4),
        dport: half(L4 + 2),
        proto: ip[9],
    })
}

fuzz_target!(|frame: &[u8]| {
    // The whole input, then every shorter window that still ends inside
    // the headers the parsers read: a bound off by one reads past it.
    let shortest = frame.len().saturating_sub(IPV4_FLOW_LEN + 1);
    for end in (shortest..=frame.len()).rev() {
        let window = frame[..end].to_vec();
        let window = window.as_slice();
        let data = window.as_ptr() as usize;
        let data_end = data + window.len();
        // SAFETY: [data, data_end) is `window`, a live slice.
        let (class, flow) = unsafe { (classify(data, data_end), ipv4_flow(data, data_end)) };
        assert_eq!(class, expected_class(window), "{window:02x?}");
        assert_eq!(flow, expected_flow(window), "{window:02x?}");
        if flow.is_some() {
            assert!(window.len() >= IPV4_FLOW_LEN);
        }
    }
});
