//! VM lane: the agent's XFRM layer in Debian's kernel (the host's has no
//! ESP). Two hosts get the policies and ESP associations the agent
//! programs for IPsec networks; UDP to the IPsec VXLAN port then travels
//! in ESP, a datagram that would go out in clear is dropped rather than
//! sent, and one arriving in clear is dropped.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use mesh_agent::dataplane::{
    netlink::Netlink,
    xfrm::{self, Change, Direction, Policy, Sa, SaId, Wanted, Xfrm},
};
use mesh_tests::{require_root, Cluster};

const PORT: u16 = 4790;

fn wanted(local: Ipv4Addr, peer: Ipv4Addr) -> Wanted {
    let sa = |src: Ipv4Addr, dst: Ipv4Addr| {
        let spi = 0x1000 + u32::from(src.octets()[3]);
        let key = [src.octets()[3]; 20];
        (SaId { src, dst, spi }, Sa { port: PORT, key })
    };
    Wanted {
        policies: [Direction::In, Direction::Out]
            .into_iter()
            .map(|direction| Policy {
                direction,
                local,
                port: PORT,
            })
            .collect(),
        sas: [sa(local, peer), sa(peer, local)].into(),
    }
}

/// Brings host `host`'s XFRM state to `want`, as the agent does, and
/// returns what the kernel then holds.
fn program(cluster: &Cluster, host: usize, want: Wanted) -> xfrm::Found {
    cluster.host(host).run(move || {
        let mut x = Xfrm::open().expect("an XFRM socket");
        let found = x.observe().expect("read the XFRM state");
        x.apply(&xfrm::plan(&want, &found)).expect("program the XFRM state");
        x.observe().expect("read it back")
    })
}

/// Whether `datagram` sent from `from` reaches `to` (bound to the port).
fn delivered(cluster: &Cluster, host: usize, from: Ipv4Addr, to: &UdpSocket, datagram: &[u8]) -> bool {
    let dst = to.local_addr().unwrap();
    let sender = cluster
        .host(host)
        .run(move || UdpSocket::bind(SocketAddr::from((from, 0))).unwrap());
    // The first send may be dropped while ARP resolves: a few tries.
    for _ in 0..5 {
        let _ = sender.send_to(datagram, dst);
        let mut buf = [0u8; 64];
        if let Ok(n) = to.recv(&mut buf) {
            assert_eq!(&buf[..n], datagram);
            return true;
        }
    }
    false
}

#[test]
#[ignore = "VM lane: needs a kernel with ESP (cargo xtask test runs it under virtme-ng)"]
fn esp_carries_the_ipsec_port_and_nothing_passes_in_clear() {
    require_root();
    let cluster = Cluster::new(2).expect("two hosts");
    let (a, b) = (cluster.host(0).address(), cluster.host(1).address());
    cluster
        .host(0)
        .run(xfrm::kernel_has_esp)
        .expect("Debian's kernel does ESP with AES-GCM");

    let on_a = program(&cluster, 0, wanted(a, b));
    let on_b = program(&cluster, 1, wanted(b, a));
    for (found, want) in [(&on_a, wanted(a, b)), (&on_b, wanted(b, a))] {
        assert_eq!(found.policies, want.policies);
        assert_eq!(found.sas, want.sas.keys().copied().collect());
    }
    // Programming again changes nothing.
    let again = cluster.host(0).run(move || {
        let mut x = Xfrm::open().unwrap();
        xfrm::plan(&wanted(a, b), &x.observe().unwrap())
    });
    assert!(again.is_empty(), "a second pass wants {again:?}");

    let receiver = cluster.host(1).run(move || UdpSocket::bind((b, PORT)).unwrap());
    receiver.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    // B takes only ESP on the port, so a delivery proves it travelled so.
    assert!(
        delivered(&cluster, 0, a, &receiver, b"sealed"),
        "UDP from a to b's IPsec port goes through ESP and arrives"
    );

    // From an address the policies do not cover, the datagram leaves in
    // clear, and B drops it.
    let other = Ipv4Addr::new(a.octets()[0], a.octets()[1], a.octets()[2], 200);
    cluster.host(0).run(move || {
        Netlink::run(|nl| async move { nl.add_address("eth0", other.into(), 24).await }).expect("a second address")
    });
    assert!(
        !delivered(&cluster, 0, other, &receiver, b"in clear"),
        "a clear datagram to the IPsec port is dropped"
    );

    // Without its association, A drops what it would send rather than
    // send it in clear.
    let outbound = *wanted(a, b).sas.keys().find(|id| id.src == a).unwrap();
    cluster
        .host(0)
        .run(move || Xfrm::open().unwrap().apply(&[Change::DeleteSa(outbound)]).unwrap());
    assert!(
        !delivered(&cluster, 0, a, &receiver, b"no key"),
        "with no association nothing is sent"
    );

    // Wanting nothing removes everything the agent made.
    for host in 0..2 {
        let left = program(&cluster, host, Wanted::default());
        assert_eq!(left, xfrm::Found::default(), "host {host} keeps no XFRM state");
    }
}
