//! Kernel lane: what a host outside the swarm can make a node send by
//! forging packets on the underlay. The routing-mesh tunnel (UDP 4792)
//! takes packets only from nodes' addresses, but a source address is easy
//! to forge: a "reply" that comes through it, carrying the node's own
//! address, is sent on only when it answers a connection the node passed
//! on, so nobody can have a node send what they like in its name. And
//! plain VXLAN aimed at a node's IPv6 addresses on the data-path port
//! never reaches an encrypted network: only what comes out of the
//! WireGuard device does.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    time::Duration,
};

use mesh_agent::{agent::mesh::kernel::TUNNEL_DEVICE, api::assignment::mesh::tunnel_port};
use mesh_common::lb::VNI_REPLY;
use mesh_tests::{
    mesh::{create_http_service, http_get},
    overlay::{endpoints, has_link, in_task, inspect, running},
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
    let port = tunnel_port(mesh_agent::api::objects::DEFAULT_DATA_PATH_PORT);
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

/// Host `host`'s link-local IPv6 address on its underlay link.
fn link_local(swarm: &Swarm, host: usize) -> Ipv6Addr {
    let out = swarm
        .cluster
        .host(host)
        .tool("ip", "-6 -o addr show dev eth0 scope link");
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a link-local address on h{host}'s eth0: {out}"))
}

/// The ifindex of `eth0` in host `host`.
fn eth0_index(swarm: &Swarm, host: usize) -> u32 {
    swarm.cluster.host(host).run(|| {
        // SAFETY: a NUL-terminated name; the call only reads it.
        unsafe { libc::if_nametoindex(c"eth0".as_ptr()) }
    })
}

#[test]
fn plain_vxlan_to_a_nodes_other_ipv6_addresses_never_reaches_an_encrypted_network() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form(2);
    swarm.ok(0, &["network", "create", "--opt", "encrypted", "sealed"]);
    let echo = mesh_tests::swarm::binary("mesh-echo");
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--mode",
            "global",
            "--name",
            "sealed-echo",
            "--network",
            "sealed",
            "--",
            echo.to_str().unwrap(),
            "7000",
        ],
    );
    swarm.wait("a task on the encrypted network on both nodes", CONVERGE, || {
        running(&swarm, "sealed-echo") == 2
    });
    let network = inspect(&swarm, "sealed");
    let vni = network["vni"]
        .as_u64()
        .or_else(|| network["network"]["vni"].as_u64())
        .unwrap_or_else(|| panic!("no VNI in {network}")) as u32;
    let (task, _, target) = endpoints(&swarm, "sealed")
        .into_iter()
        .find(|(_, node, _)| node == "h0")
        .expect("h0's task");
    let (_, _, peer) = endpoints(&swarm, "sealed")
        .into_iter()
        .find(|(_, node, _)| node == "h1")
        .expect("h1's task");
    // h0 and the attacker also share a global IPv6 prefix on the underlay.
    let (h0_global, attacker_global): (Ipv6Addr, Ipv6Addr) =
        ("2001:db8:5ea1::1".parse().unwrap(), "2001:db8:5ea1::3".parse().unwrap());
    swarm
        .cluster
        .host(0)
        .tool("ip", &format!("-6 addr add {h0_global}/64 dev eth0 nodad"));
    swarm
        .cluster
        .host(ATTACKER)
        .tool("ip", &format!("-6 addr add {attacker_global}/64 dev eth0 nodad"));
    let h0_link_local = link_local(&swarm, 0);
    let scope = eth0_index(&swarm, ATTACKER);
    let port = mesh_agent::api::objects::DEFAULT_DATA_PATH_PORT;

    // What the attacker sends: a datagram from h1's task to h0's, as an
    // encrypted network's VXLAN would carry it (broadcast MAC, so no
    // neighbour needs to be known), to each of h0's IPv6 addresses.
    const MARK: &[u8] = b"forged-into-sealed";
    const LISTEN: u16 = 7777;
    let mut frame = udp4((peer, 40000), (target, LISTEN), MARK);
    frame[..6].copy_from_slice(&[0xff; 6]);
    let datagram = vxlan(vni, &frame);
    let received = std::thread::scope(|scope_| {
        let listener = scope_.spawn(|| {
            in_task(&swarm, 0, &task, || {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, LISTEN)).expect("a listener in h0's task");
                socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 64];
                socket
                    .recv_from(&mut buf)
                    .ok()
                    .map(|(n, from)| (from, buf[..n].to_vec()))
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let sent = swarm.cluster.host(ATTACKER).run(|| {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("an IPv6 socket");
            let targets = [
                SocketAddr::V6(SocketAddrV6::new(h0_link_local, port, 0, scope)),
                SocketAddr::new(h0_global.into(), port),
            ];
            let mut sent = 0;
            for _ in 0..5 {
                for to in targets {
                    match socket.send_to(&datagram, to) {
                        Ok(_) => sent += 1,
                        Err(e) => eprintln!("sending to {to}: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        });
        assert_eq!(sent, 10, "the forged datagrams left the attacker");
        listener.join().unwrap()
    });
    assert_eq!(
        received, None,
        "plain VXLAN sent to h0's link-local and global IPv6 addresses reached a task on an encrypted network"
    );
    // The encrypted network itself still carries traffic between the tasks.
    let from_peer = in_task(&swarm, 0, &task, move || {
        std::net::TcpStream::connect_timeout(&SocketAddr::new(peer.into(), 7000), Duration::from_secs(5)).is_ok()
    });
    assert!(from_peer, "h0's task reaches h1's over the encrypted network");
}
