//! VM lane: every mesh-ebpf program passes the verifier of Debian's 6.1
//! kernel too (the oldest kernel the test lanes boot; the kernel lane
//! checks the host's), and the routing mesh's ingress program serves a
//! published port there as on the host, its TC programs as clsact filters
//! (no tcx on 6.1).

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_agent::{
    agent::mesh::kernel::{MeshTables, PROGRAM_INGRESS},
    api::{
        assignment::mesh::{MeshAssignment, MeshBackend, MeshService},
        service::{LbOptions, PortPublish},
    },
    dataplane::{ebpf::EbpfDataplane, lb::LbMaps},
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

/// Slower Raft timing: the VM emulates its CPUs in software.
const RAFT: &[&str] = &["--raft-heartbeat", "250ms", "--raft-election-timeout", "1500ms"];

/// The routing mesh end to end on 6.1, where the TC programs are clsact
/// filters (no tcx): a published port answers on both nodes, from both
/// tasks, and requests and replies go straight into and out of each
/// task's veth (`bpf_redirect_peer`, `tc_from_task`), past the bridge.
#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn a_published_port_is_served_through_the_task_veths_with_clsact_filters() {
    use mesh_agent::agent::mesh::kernel::TUNNEL_DEVICE;
    use mesh_tests::{
        mesh::{bridge_frames, spray},
        overlay::{has_link, running},
        swarm::Swarm,
    };
    use std::time::Duration;
    const CONVERGE: Duration = Duration::from_secs(60);
    const CLIENT: usize = 2;
    const REQUESTS_PER_NODE: usize = 20;
    require_root();
    let swarm = Swarm::with_flags(3, RAFT);
    swarm.form(2);
    mesh_tests::mesh::create_http_service(
        &swarm,
        "web",
        &[
            "--replicas",
            "2",
            "--replicas-max-per-node",
            "1",
            "--publish",
            "8080:80",
        ],
    );
    swarm.wait("2 web tasks running", CONVERGE, || running(&swarm, "web") == 2);
    swarm.wait("both nodes' 8080 answer", CONVERGE, || {
        spray(&swarm, CLIENT, 2, 8080, 2).0.is_empty()
    });
    let before = bridge_frames(&swarm, 2);
    let (failures, per_task, seen) = spray(&swarm, CLIENT, 2, 8080, REQUESTS_PER_NODE);
    let after = bridge_frames(&swarm, 2);
    println!("requests per task: {per_task:?}; bridge frames before {before:?}, after {after:?}");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(per_task.len(), 2, "both tasks serve: {per_task:?}");
    assert_eq!(seen, vec![mesh_tests::cluster::host_address(CLIENT).to_string()]);
    let requests = (2 * REQUESTS_PER_NODE) as u64;
    assert!(
        after.0 - before.0 < requests && after.1 - before.1 < requests,
        "{requests} requests crossed the task bridge: {before:?} -> {after:?} (up to the node, into tasks)"
    );
    swarm.ok(0, &["service", "rm", "web"]);
    for host in 0..2 {
        swarm.wait("the tunnel device removed", CONVERGE, || {
            !has_link(&swarm, host, TUNNEL_DEVICE)
        });
    }
}
