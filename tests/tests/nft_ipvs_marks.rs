//! Kernel lane: the firewall half of the IPVS routing mesh
//! (dataplane/nftables/marks.rs) in the host's kernel, which has nftables
//! but no IPVS. Host 0 is the node, host 1 another swarm node, host 2 a
//! client. A connection to the published port gets the cluster mark from
//! the client and the local mark from the peer; `nft` reads the table
//! back as the rules the module documents. (IPVS itself, fed by these
//! marks, is tested in the VM lane: vm_mesh_ipvs.rs.)

use std::{net::TcpStream, time::Duration};

use mesh_agent::dataplane::nftables::{
    marks::{ipvs_marks_batch, remove_ipvs_marks_batch, IpvsMarks, MarkedPort, IPVS_TABLE},
    send_batch,
};
use mesh_tests::{cluster::host_address, require_root, Cluster};

const CLUSTER_MARK: u32 = 0x6d00_1f90;
const LOCAL_MARK: u32 = 0x6d02_1f90;

fn nft(cluster: &Cluster, host: usize, args: &str) -> String {
    cluster.host(host).tool("nft", args)
}

/// Packets host 0 took in with `mark`, by the counting table's rule.
fn counted(cluster: &Cluster, mark: u32) -> u64 {
    let listing = nft(cluster, 0, "list chain ip count input");
    let line = listing
        .lines()
        .find(|l| l.contains(&format!("meta mark 0x{mark:08x}")))
        .unwrap_or_else(|| panic!("no counting rule for {mark:#x} in {listing}"));
    let at = line.find("packets ").expect("a counter") + "packets ".len();
    line[at..].split(' ').next().unwrap().parse().expect("a number")
}

fn connect_from(cluster: &Cluster, host: usize) {
    let to = (host_address(0), 8080).into();
    cluster.host(host).run(move || {
        // Nobody listens: the SYN is counted, then refused.
        let _ = TcpStream::connect_timeout(&to, Duration::from_secs(1));
    });
}

#[test]
fn client_connections_get_the_cluster_mark_and_peer_connections_the_local_one() {
    require_root();
    let cluster = Cluster::new(3).expect("3 hosts");
    let marks = IpvsMarks {
        node: host_address(0),
        peers: vec![host_address(1)],
        ports: vec![MarkedPort {
            protocol: 6,
            port: 8080,
            clients: Some(CLUSTER_MARK),
            local: LOCAL_MARK,
        }],
        snat_mask: 0xff02_0000,
        snat_bits: 0x6d00_0000,
    };
    cluster
        .host(0)
        .run(|| send_batch(&ipvs_marks_batch(&marks)))
        .expect("the kernel takes the mark table");
    // Twice: the second batch replaces the first whole.
    cluster
        .host(0)
        .run(|| send_batch(&ipvs_marks_batch(&marks)))
        .expect("the kernel takes the mark table again");
    let listing = nft(&cluster, 0, &format!("list table ip {IPVS_TABLE}"));
    println!("{listing}");
    for expected in [
        format!("elements = {{ {} }}", host_address(1)),
        format!(
            "ip daddr {} tcp dport 8080 ip saddr @peers meta mark set 0x{LOCAL_MARK:08x} accept",
            host_address(0)
        ),
        format!(
            "ip daddr {} tcp dport 8080 meta mark set 0x{CLUSTER_MARK:08x}",
            host_address(0)
        ),
        format!("ip daddr @peers snat to {}", host_address(0)),
    ] {
        assert!(listing.contains(&expected), "`{expected}` missing from:\n{listing}");
    }
    assert_eq!(
        listing.matches("meta mark set").count(),
        2,
        "one rule each, not doubled"
    );

    nft(&cluster, 0, "add table ip count");
    nft(
        &cluster,
        0,
        "add chain ip count input { type filter hook input priority 0 ; }",
    );
    for mark in [CLUSTER_MARK, LOCAL_MARK] {
        nft(
            &cluster,
            0,
            &format!("add rule ip count input meta mark 0x{mark:08x} counter"),
        );
    }
    connect_from(&cluster, 2);
    assert!(
        counted(&cluster, CLUSTER_MARK) >= 1,
        "the client's SYN has the cluster mark"
    );
    assert_eq!(counted(&cluster, LOCAL_MARK), 0);
    connect_from(&cluster, 1);
    assert!(counted(&cluster, LOCAL_MARK) >= 1, "the peer's SYN has the local mark");

    cluster
        .host(0)
        .run(|| send_batch(&remove_ipvs_marks_batch()))
        .expect("remove the table");
    let tables = nft(&cluster, 0, "list tables");
    assert!(!tables.contains(IPVS_TABLE), "the table is gone: {tables}");
    cluster
        .host(0)
        .run(|| send_batch(&remove_ipvs_marks_batch()))
        .expect("removing a missing table is no error");
}
