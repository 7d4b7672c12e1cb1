//! Kernel lane: what a host outside the swarm can make a node send by
//! forging packets on the underlay. The routing-mesh tunnel (UDP 4792)
//! takes packets only from nodes' addresses, but a source address is easy
//! to forge: a "reply" that comes through it, carrying the node's own
//! address, is sent on only when it answers a connection the node passed
//! on, so nobody can have a node send what they like in its name.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use mesh_agent::runtime::mesh::{tunnel_port, TUNNEL_DEVICE};
use mesh_common::lb::VNI_REPLY;
use mesh_tests::{
    mesh::{create_http_service, http_get},
    overlay::{has_link, running},
    packet::udp4,
    require_root,
    swarm::{Swarm, TUNNEL_AGENT_FLAGS},
};

const CONVERGE: Duration = Duration::from_secs(30);
const ATTACKER: usize = 2;
/// Where the forged inner packet would go: a port on the attacker's host.
const SINK_PORT: u16 = 9999;

/// A VXLAN datagram's payload: the header (VNI `vni`), then `frame`.
fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

#[test]
fn a_reply_forged_into_the_tunnel_from_a_spoofed_node_is_not_relayed() {
    require_root();
    let swarm = Swarm::with_flags(3, TUNNEL_AGENT_FLAGS);
    swarm.form(2);
    create_http_service(&swarm, "web", &["--replicas", "2", "--publish", "8080:80"]);
    swarm.wait("web running with its tunnel", CONVERGE, || {
        running(&swarm, "web") == 2 && has_link(&swarm, 0, TUNNEL_DEVICE)
    });
    let (node, other, attacker) = (
        swarm.cluster.host(0).address(),
        swarm.cluster.host(1).address(),
        swarm.cluster.host(ATTACKER).address(),
    );
    // The mesh works from the attacker's host, as from any client.
    swarm.wait("h0 answers 8080", CONVERGE, || {
        swarm
            .cluster
            .host(ATTACKER)
            .run(|| http_get(SocketAddr::new(node.into(), 8080)).is_ok())
    });

    // The attacker takes h1's address as a source: on its loopback, so it
    // answers no ARP for it, and announces with its own.
    swarm
        .cluster
        .host(ATTACKER)
        .tool("ip", &format!("addr add {other}/32 dev lo"));
    swarm.cluster.host(ATTACKER).run(|| {
        std::fs::write("/proc/sys/net/ipv4/conf/all/arp_announce", "2").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/all/arp_ignore", "1").unwrap();
    });
    let port = tunnel_port(mesh_agent::control::state::DEFAULT_DATA_PATH_PORT);
    let (forged, relayed) = swarm.cluster.host(ATTACKER).run(|| {
        let sink = UdpSocket::bind((attacker, SINK_PORT)).expect("the attacker's sink");
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let forged = vxlan(VNI_REPLY, &udp4((node, 8080), (attacker, SINK_PORT), b"relayed"));
        let from = UdpSocket::bind((other, 0)).expect("bind the spoofed source");
        let mut sent = 0;
        for _ in 0..5 {
            sent += usize::from(from.send_to(&forged, (node, port)).is_ok());
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut buf = [0u8; 64];
        (
            sent,
            sink.recv_from(&mut buf).ok().map(|(n, from)| (from, buf[..n].to_vec())),
        )
    });
    assert_eq!(forged, 5, "the forged datagrams left the attacker");
    assert_eq!(
        relayed, None,
        "h0 sent on a reply it never routed, in its own name, to the attacker's sink"
    );
    // The mesh itself still answers through the tunnel.
    swarm.wait("h0 still answers 8080", CONVERGE, || {
        swarm
            .cluster
            .host(ATTACKER)
            .run(|| http_get(SocketAddr::new(node.into(), 8080)).is_ok())
    });
}
