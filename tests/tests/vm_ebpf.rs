//! VM lane: every mesh-ebpf program passes the verifier of Debian's 6.1
//! kernel too (the oldest kernel the test lanes boot; the kernel lane
//! checks the host's), and the routing mesh's ingress program serves a
//! published port there as on the host.

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_agent::{
    control::{
        mesh::{MeshAssignment, MeshBackend, MeshService},
        service::{LbOptions, PortPublish},
    },
    dataplane::{ebpf::EbpfDataplane, lb::LbMaps},
    runtime::mesh::{MeshTables, PROGRAM_INGRESS},
};
use mesh_common::lb::NodeConfig;
use mesh_tests::{packet, require_root, test_run::test_run};

#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn every_program_loads_and_a_published_port_is_served() {
    require_root();
    let mut dataplane = EbpfDataplane::load().unwrap_or_else(|e| panic!("the 6.1 verifier refused a program: {e}"));
    println!("loaded: {:?}", dataplane.program_names());
    let mut maps = LbMaps::take(&mut dataplane).expect("the maps");
    let node = Ipv4Addr::new(192, 0, 2, 1);
    let task = Ipv4Addr::new(172, 18, 0, 2);
    maps.set_config(NodeConfig {
        addr: u32::from_ne_bytes(node.octets()),
        ifindex: 1,
        tunnel_ifindex: 1,
        bridge_ifindex: 1,
    })
    .expect("config");
    let mut service = MeshService {
        service: 1,
        name: "web".into(),
        ports: vec![PortPublish::parse("8080:80").unwrap()],
        lb: LbOptions::default(),
        backends: vec![MeshBackend {
            task: 10,
            node_addr: node.to_string(),
            local: true,
        }],
        runs_here: true,
        digest: 0,
    };
    service.digest = service.content_digest();
    let mesh = MeshAssignment {
        services: vec![service],
        peers: vec![],
    };
    let mut tables = MeshTables::default();
    maps.apply(&tables.update(&mesh, &BTreeMap::from([(10, task)]), &|_| false))
        .expect("write the maps");
    let client = Ipv4Addr::new(198, 51, 100, 7);
    let fd = dataplane.program_fd(PROGRAM_INGRESS).expect("fd");
    let run = test_run(fd, &packet::tcp4_syn((client, 40000), (node, 8080), 1), 1).expect("test run");
    assert_eq!(run.verdict, 7, "redirected to the task bridge");
    assert_eq!(run.packet, packet::tcp4_syn((client, 40000), (task, 80), 1));
}
