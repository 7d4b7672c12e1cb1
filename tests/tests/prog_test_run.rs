//! Kernel lane: packet fixtures through BPF_PROG_TEST_RUN, as Katran tests
//! its programs: input packet -> expected verdict, output packet, counters.

use std::net::{Ipv4Addr, Ipv6Addr};

use mesh_agent::dataplane::ebpf::{EbpfDataplane, TC_COUNT, XDP_COUNT};
use mesh_common::counters::{Counter, Hook, ProtoClass};
use mesh_tests::{packet, require_root, test_run::test_run};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// (what, packet, class). The truncated frame is XDP-only: the kernel refuses
/// to build an skb around a cut IPv4 header, so TC never sees one.
fn fixtures(hook: Hook) -> Vec<(&'static str, Vec<u8>, ProtoClass)> {
    let (a6, b6) = (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
    );
    let mut truncated = packet::udp4((A, 1000), (B, 53), b"");
    truncated.truncate(14 + 5);
    let mut all = vec![
        (
            "udp over ipv4",
            packet::udp4((A, 40000), (B, 53), b"query"),
            ProtoClass::Udp,
        ),
        (
            "tcp syn over ipv4",
            packet::tcp4_syn((A, 40000), (B, 80), 1),
            ProtoClass::Tcp,
        ),
        ("icmp echo", packet::icmp4_echo(A, B, 7, 1), ProtoClass::Icmp),
        (
            "udp over ipv6",
            packet::udp6((a6, 40000), (b6, 53), b"query"),
            ProtoClass::Udp,
        ),
        ("arp request", packet::arp_request(A, B), ProtoClass::Other),
    ];
    if hook == Hook::Xdp {
        all.push(("ipv4 header cut short", truncated, ProtoClass::Other));
    }
    all
}

fn check(program: &str, hook: Hook, verdict: u32) {
    require_root();
    let dataplane = EbpfDataplane::load().expect("load mesh-ebpf");
    let fd = dataplane.program_fd(program).expect("program fd");
    for (what, input, class) in fixtures(hook) {
        let before = dataplane.counters().expect("counters");
        let run = test_run(fd, &input, 1).unwrap_or_else(|e| panic!("{program} on {what}: BPF_PROG_TEST_RUN: {e}"));
        assert_eq!(run.verdict, verdict, "{program} on {what}: verdict");
        assert_eq!(run.packet, input, "{program} on {what}: the packet must pass unchanged");
        let after = dataplane.counters().expect("counters");
        for c in ProtoClass::ALL {
            let expected = if c == class {
                Counter {
                    packets: 1,
                    bytes: input.len() as u64,
                }
            } else {
                Counter::default()
            };
            let got = Counter {
                packets: after.get(hook, c).packets - before.get(hook, c).packets,
                bytes: after.get(hook, c).bytes - before.get(hook, c).bytes,
            };
            assert_eq!(got, expected, "{program} on {what}: counted as {} ", c.name());
        }
    }
}

#[test]
fn xdp_count_passes_every_packet_and_counts_it_by_protocol() {
    check(XDP_COUNT, Hook::Xdp, XDP_PASS);
}

#[test]
fn tc_count_passes_every_packet_and_counts_it_by_protocol() {
    check(TC_COUNT, Hook::Tc, TC_ACT_OK);
}
