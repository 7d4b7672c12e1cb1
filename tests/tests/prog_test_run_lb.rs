//! Kernel lane: the routing mesh's programs through BPF_PROG_TEST_RUN, as
//! Katran tests its own: a packet in, the maps as the agent writes them,
//! the verdict and the packet out compared with a fixture built from
//! scratch (so the programs' incremental checksums must be right).

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_agent::{
    agent::mesh::kernel::{MeshTables, PROGRAM_INGRESS, PROGRAM_REPLY, PROGRAM_TUNNEL},
    api::{
        assignment::mesh::{MeshAssignment, MeshBackend, MeshService},
        service::{LbOptions, PortPublish},
    },
    dataplane::{ebpf::EbpfDataplane, lb::LbMaps},
};
use mesh_common::lb::NodeConfig;
use mesh_tests::{packet, require_root, test_run::test_run};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// This node, another node, a client and two local tasks.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const TASK_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const TASK_B: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

fn wire(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

struct Node {
    dataplane: EbpfDataplane,
    maps: LbMaps,
    tables: MeshTables,
}

impl Node {
    fn new() -> Node {
        require_root();
        let mut dataplane = EbpfDataplane::load().expect("load mesh-ebpf");
        let mut maps = LbMaps::take(&mut dataplane).expect("the maps");
        maps.set_config(NodeConfig {
            addr: wire(NODE),
            ifindex: 1,
            tunnel_ifindex: 1,
            bridge_ifindex: 1,
        })
        .expect("config");
        Node {
            dataplane,
            maps,
            tables: MeshTables::default(),
        }
    }

    /// Writes the maps for `web` (8080 -> 80/tcp, 5353 -> 53/udp) with
    /// these tasks: (task ID, its node, its local address if here); the
    /// other node is reached through the tunnel.
    fn serve(&mut self, tasks: &[(u64, Ipv4Addr, Option<Ipv4Addr>)]) {
        self.serve_with(tasks, false);
    }

    /// As [`Node::serve`], the other node being on this node's link or not.
    fn serve_with(&mut self, tasks: &[(u64, Ipv4Addr, Option<Ipv4Addr>)], on_link: bool) {
        let mesh = MeshAssignment {
            services: vec![MeshService {
                service: 1,
                name: "web".into(),
                ports: vec![
                    PortPublish::parse("8080:80").unwrap(),
                    PortPublish::parse("5353:53/udp").unwrap(),
                ],
                lb: LbOptions::default(),
                backends: tasks
                    .iter()
                    .map(|(task, node, local)| MeshBackend {
                        task: *task,
                        node_addr: node.to_string(),
                        local: local.is_some(),
                    })
                    .collect(),
                runs_here: tasks.iter().any(|(_, _, l)| l.is_some()),
                digest: 0,
            }],
            peers: vec![OTHER.to_string()],
        };
        let local: BTreeMap<u64, Ipv4Addr> = tasks.iter().filter_map(|(t, _, l)| Some((*t, (*l)?))).collect();
        let changes = self.tables.update(&mesh, &local, &|_| on_link);
        self.maps.apply(&changes).expect("write the maps");
    }

    fn run(&self, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
        let fd = self.dataplane.program_fd(program).expect("program fd");
        let run = test_run(fd, input, 1).unwrap_or_else(|e| panic!("{program}: BPF_PROG_TEST_RUN: {e}"));
        (run.verdict, run.packet)
    }
}

#[test]
fn a_published_port_goes_to_a_local_task_and_its_reply_gets_the_published_address_back() {
    let mut node = Node::new();
    node.serve(&[(10, NODE, Some(TASK_A))]);
    let (verdict, out) = node.run(PROGRAM_INGRESS, &packet::tcp4_syn((CLIENT, 40000), (NODE, 8080), 1));
    assert_eq!(verdict, TC_ACT_REDIRECT, "to the task bridge");
    assert_eq!(
        out,
        packet::tcp4_syn((CLIENT, 40000), (TASK_A, 80), 1),
        "destination rewritten, checksums right"
    );

    let reply = packet::tcp4((TASK_A, 80), (CLIENT, 40000), 9, packet::TCP_SYN | packet::TCP_ACK);
    let (verdict, out) = node.run(PROGRAM_REPLY, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "out of the underlay");
    assert_eq!(
        out,
        packet::tcp4((NODE, 8080), (CLIENT, 40000), 9, packet::TCP_SYN | packet::TCP_ACK),
        "source put back to the published address"
    );

    // UDP the same way.
    let (verdict, out) = node.run(PROGRAM_INGRESS, &packet::udp4((CLIENT, 5000), (NODE, 5353), b"query"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet::udp4((CLIENT, 5000), (TASK_A, 53), b"query"));
    let (verdict, out) = node.run(PROGRAM_REPLY, &packet::udp4((TASK_A, 53), (CLIENT, 5000), b"answer"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet::udp4((NODE, 5353), (CLIENT, 5000), b"answer"));

    // The counters: per port, per task, and the tracked connections.
    let (ports, tasks) = node.tables.labels();
    let counters = node.maps.counters(ports.keys().copied()).expect("read the counters");
    let tcp = ports.iter().find(|(_, k)| k.1 == 8080).map(|(id, _)| *id).unwrap();
    assert_eq!(counters.services[&tcp].connections, 1);
    assert!(
        counters.services[&tcp].packets >= 2,
        "the SYN and the reply: {:?}",
        counters.services[&tcp]
    );
    assert_eq!(counters.conntrack[&tcp], 1);
    let task = counters
        .backends
        .iter()
        .find(|(id, _)| tasks[id].1 == (10, 0))
        .map(|(_, s)| *s)
        .unwrap();
    assert_eq!(
        (task.connections, task.packets),
        (2, 2),
        "one TCP and one UDP connection, one packet each toward the task"
    );

    // The service goes: its ID is free again, and its counters are zero
    // for whichever service gets it next.
    let gone = node
        .tables
        .update(&MeshAssignment::default(), &BTreeMap::new(), &|_| false);
    node.maps.apply(&gone).expect("remove the service");
    let counters = node.maps.counters([tcp]).expect("read the counters");
    assert_eq!(counters.services[&tcp], Default::default());
}

#[test]
fn a_remote_backend_gets_the_packet_unchanged_through_the_tunnel() {
    let mut node = Node::new();
    node.serve(&[(20, OTHER, None)]);
    let input = packet::tcp4_syn((CLIENT, 40001), (NODE, 8080), 1);
    let (verdict, out) = node.run(PROGRAM_INGRESS, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel device");
    assert_eq!(out, input, "the client's packet travels as sent");
}

#[test]
fn everything_else_passes_untouched() {
    let mut node = Node::new();
    node.serve(&[(10, NODE, Some(TASK_A))]);
    let mut fragment = packet::udp4((CLIENT, 5000), (NODE, 5353), b"first part");
    fragment[14 + 6] |= 0x20; // more fragments
    let mut options = packet::tcp4_syn((CLIENT, 40000), (NODE, 8080), 1);
    options[14] = 0x46; // a header length with options
    let fixtures = [
        (
            "a port nothing publishes",
            packet::tcp4_syn((CLIENT, 40000), (NODE, 9999), 1),
        ),
        ("another address", packet::tcp4_syn((CLIENT, 40000), (OTHER, 8080), 1)),
        (
            "udp to a tcp-only port",
            packet::udp4((CLIENT, 40000), (NODE, 8080), b"x"),
        ),
        ("an icmp echo", packet::icmp4_echo(CLIENT, NODE, 1, 1)),
        ("an ip fragment", fragment),
        ("an ipv4 header with options", options),
        ("arp", packet::arp_request(CLIENT, NODE)),
    ];
    for (what, input) in fixtures {
        let (verdict, out) = node.run(PROGRAM_INGRESS, &input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input), "tc_ingress on {what}");
        let (verdict, out) = node.run(PROGRAM_REPLY, &input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input), "tc_reply on {what}");
    }
    // A task's own traffic (no routed connection) leaves as it is.
    let own = packet::tcp4_syn((TASK_A, 50000), (CLIENT, 443), 1);
    assert_eq!(node.run(PROGRAM_REPLY, &own), (TC_ACT_OK, own));
}

#[test]
fn a_port_with_no_task_refuses_and_the_tunnel_takes_only_tunnelled_packets() {
    let mut node = Node::new();
    node.serve(&[]);
    let (verdict, _) = node.run(PROGRAM_INGRESS, &packet::tcp4_syn((CLIENT, 40000), (NODE, 8080), 1));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "no running task: dropped, not answered by the node"
    );
    let (verdict, _) = node.run(PROGRAM_TUNNEL, &packet::tcp4_syn((CLIENT, 40000), (NODE, 8080), 1));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a packet without tunnel metadata is not a tunnelled one"
    );
}

#[test]
fn connections_keep_their_task_across_table_changes_and_move_only_when_it_leaves() {
    let mut node = Node::new();
    node.serve(&[(10, NODE, Some(TASK_A)), (11, NODE, Some(TASK_B))]);
    // Open 16 connections; note where each went.
    let mut placed = Vec::new();
    for port in 41000..41016u16 {
        let (_, out) = node.run(PROGRAM_INGRESS, &packet::tcp4_syn((CLIENT, port), (NODE, 8080), 1));
        let task = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        placed.push((port, task));
    }
    assert!(placed.iter().any(|(_, t)| *t == TASK_A) && placed.iter().any(|(_, t)| *t == TASK_B));
    // A third task joins: the table changes, established connections do not.
    node.serve(&[(10, NODE, Some(TASK_A)), (11, NODE, Some(TASK_B)), (12, OTHER, None)]);
    for (port, task) in &placed {
        let ack = packet::tcp4((CLIENT, *port), (NODE, 8080), 2, packet::TCP_ACK);
        let (verdict, out) = node.run(PROGRAM_INGRESS, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            packet::tcp4((CLIENT, *port), (*task, 80), 2, packet::TCP_ACK),
            "conntrack keeps port {port} on {task}"
        );
    }
    // Task A leaves: its connections get another task (whose kernel resets
    // them), B's stay.
    node.serve(&[(11, NODE, Some(TASK_B)), (12, OTHER, None)]);
    for (port, task) in &placed {
        let ack = packet::tcp4((CLIENT, *port), (NODE, 8080), 3, packet::TCP_ACK);
        let (verdict, out) = node.run(PROGRAM_INGRESS, &ack);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        if *task == TASK_B {
            assert_eq!(out, packet::tcp4((CLIENT, *port), (TASK_B, 80), 3, packet::TCP_ACK));
        } else {
            let now = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            assert_ne!(now, TASK_A, "port {port} must leave the removed task");
        }
    }
    // A task that never took a packet here (no counters) leaves cleanly too.
    node.serve(&[(11, NODE, Some(TASK_B))]);
}

/// The frame as the kernel sees one sent to this host's MAC address under
/// BPF_PROG_TEST_RUN (it compares with the loopback device's, all zeros).
fn to_our_mac(mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].fill(0);
    frame
}

#[test]
fn a_node_on_the_link_gets_the_packet_as_it_is_and_answers_back_the_same_way() {
    // The entry node: the task runs on the other node, on the same link.
    let mut entry = Node::new();
    entry.serve_with(&[(20, OTHER, None)], true);
    let syn = packet::tcp4_syn((CLIENT, 40100), (NODE, 8080), 1);
    let (verdict, out) = entry.run(PROGRAM_INGRESS, &syn);
    assert_eq!(
        (verdict, &out),
        (TC_ACT_REDIRECT, &syn),
        "to the other node's MAC, unchanged"
    );

    // The task's node (here this node plays it: OTHER was the entry): a
    // request for OTHER's published port, sent to our MAC.
    let mut backend = Node::new();
    backend.serve_with(&[(21, NODE, Some(TASK_A))], true);
    let request = to_our_mac(packet::tcp4_syn((CLIENT, 40101), (OTHER, 8080), 1));
    let (verdict, out) = backend.run(PROGRAM_INGRESS, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT, "to the task bridge");
    assert_eq!(out, to_our_mac(packet::tcp4_syn((CLIENT, 40101), (TASK_A, 80), 1)));
    // A frame for someone else's MAC that a bridge flooded here: not ours.
    let flooded = packet::tcp4_syn((CLIENT, 40102), (OTHER, 8080), 1);
    assert_eq!(backend.run(PROGRAM_INGRESS, &flooded), (TC_ACT_OK, flooded));
    // The task's reply gets the entry node's address and goes back to it.
    let reply = packet::tcp4((TASK_A, 80), (CLIENT, 40101), 9, packet::TCP_SYN | packet::TCP_ACK);
    let (verdict, out) = backend.run(PROGRAM_REPLY, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "to the entry node's MAC");
    assert_eq!(
        out,
        packet::tcp4((OTHER, 8080), (CLIENT, 40101), 9, packet::TCP_SYN | packet::TCP_ACK)
    );

    // Back at the entry node: the reply carries its address, for a
    // connection it tracks, so it goes on to the client; one it does not
    // track is not passed on.
    let back = to_our_mac(packet::tcp4(
        (NODE, 8080),
        (CLIENT, 40100),
        9,
        packet::TCP_SYN | packet::TCP_ACK,
    ));
    let (verdict, out) = entry.run(PROGRAM_INGRESS, &back);
    assert_eq!((verdict, &out), (TC_ACT_REDIRECT, &back), "out to the client");
    let forged = to_our_mac(packet::tcp4((NODE, 8080), (CLIENT, 40999), 9, packet::TCP_ACK));
    assert_eq!(
        entry.run(PROGRAM_INGRESS, &forged),
        (TC_ACT_OK, forged.clone()),
        "no tracked connection: the kernel's"
    );
}
