//! VM lane: the routing mesh on IPVS (`mesh-agent run --lb-backend ipvs`)
//! in Debian's kernel (the host's has no IPVS). The kernel lane's HTTP
//! scenario: a 3-replica service published on 8080 answers on every
//! node's address and every task serves some of the requests; the
//! firewall marks and IPVS services are there on every node; a node's own
//! connections to its published port are served too; scaling down
//! takes the task out of every node's IPVS; forwarding goes on while an
//! agent is down and after it restarts; client-IP affinity keeps a client
//! on one task per entry node (IPVS hashes per node); a node
//! restarted on the eBPF backend drops what the IPVS backend left;
//! removing the services removes the rest.
//!
//! Hosts 0-2 form the swarm; host 3 is the client, outside it.

use std::{collections::BTreeSet, process::Command, time::Duration};

use mesh_agent::{
    agent::mesh::{ipvs::owned, kernel::TUNNEL_DEVICE},
    dataplane::ipvs::{Ipvs, IpvsState},
};
use mesh_tests::{
    cluster::host_address,
    mesh::spray,
    overlay::{has_link, running},
    require_root,
    swarm::Swarm,
};

/// Slower Raft timing: the VM emulates its CPUs in software.
const RAFT: [&str; 4] = ["--raft-heartbeat", "250ms", "--raft-election-timeout", "1500ms"];
const IPVS_FLAGS: &[&str] = &[RAFT[0], RAFT[1], RAFT[2], RAFT[3], "--lb-backend", "ipvs"];
const EBPF_FLAGS: &[&str] = &[RAFT[0], RAFT[1], RAFT[2], RAFT[3]];
const CONVERGE: Duration = Duration::from_secs(60);
const CLIENT: usize = 3;
const REQUESTS_PER_NODE: usize = 20;

/// The agent's IPVS services on host `host`.
fn ipvs_on(swarm: &Swarm, host: usize) -> IpvsState {
    swarm.cluster.host(host).run(|| {
        Ipvs::open()
            .expect("the IPVS family")
            .observe(owned)
            .expect("read IPVS")
    })
}

/// Real servers of host `host`'s IPVS services, all of them.
fn real_servers(swarm: &Swarm, host: usize) -> BTreeSet<String> {
    ipvs_on(swarm, host)
        .values()
        .flat_map(|s| s.dests.keys().map(|d| format!("{}:{}", d.addr, d.port)))
        .collect()
}

fn has_mark_table(swarm: &Swarm, host: usize) -> bool {
    let mut c = Command::new("nft");
    c.args(["list", "tables"]);
    let out = swarm
        .cluster
        .host(host)
        .output(c, Duration::from_secs(10))
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).contains("mesh-ipvs")
}

#[test]
#[ignore = "vm lane: needs Debian's kernel (IPVS); run by `cargo xtask test` inside virtme-ng"]
fn a_published_port_on_ipvs_answers_on_every_node_from_every_task() {
    require_root();
    let load = Command::new("modprobe").arg("ip_vs").output().expect("modprobe");
    assert!(
        load.status.success(),
        "modprobe ip_vs: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let mut swarm = Swarm::with_flags(4, IPVS_FLAGS);
    swarm.form(3);
    mesh_tests::mesh::create_http_service(
        &swarm,
        "web",
        &[
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--publish",
            "8080:80",
        ],
    );
    swarm.wait("3 web tasks running", CONVERGE, || running(&swarm, "web") == 3);
    // Each node: a cluster service (its task and the two other nodes) and
    // a local one (its task), and the mark table; no eBPF tunnel.
    for host in 0..3 {
        swarm.wait("IPVS services with 3 real servers", CONVERGE, || {
            real_servers(&swarm, host).len() == 3
        });
        let services = ipvs_on(&swarm, host);
        assert_eq!(services.len(), 2, "host {host}: {services:?}");
        assert!(
            services.values().all(|s| s.schedule.scheduler == "mh"),
            "Maglev is IPVS's mh: {services:?}"
        );
        assert!(has_mark_table(&swarm, host), "host {host} has the mark table");
        assert!(!has_link(&swarm, host, TUNNEL_DEVICE), "no eBPF tunnel on host {host}");
    }

    swarm.wait("every node's 8080 answers", CONVERGE, || {
        spray(&swarm, CLIENT, 3, 8080, 2).0.is_empty()
    });
    let (failures, per_task, seen) = spray(&swarm, CLIENT, 3, 8080, REQUESTS_PER_NODE);
    println!(
        "requests per task over {} requests: {per_task:?}; client addresses the tasks saw: {seen:?}",
        3 * REQUESTS_PER_NODE
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(per_task.len(), 3, "every task serves some requests: {per_task:?}");
    // Served on the entry node: the client's own address; passed on: the
    // entry node's (as in Swarm).
    let allowed: Vec<String> = [CLIENT, 0, 1, 2].iter().map(|h| host_address(*h).to_string()).collect();
    assert!(
        seen.iter().all(|s| allowed.contains(s)),
        "tasks saw {seen:?}, expected among {allowed:?}"
    );

    // IPVS's statistics as metrics (IPVS folds its per-CPU counters into
    // what it reports every 2 s).
    let mut text = String::new();
    swarm.wait("IPVS's counters in the metrics", CONVERGE, || {
        text = mesh_tests::mesh::metrics_get(&swarm, 0, "/metrics").1;
        let packets = mesh_tests::mesh::sample(
            &text,
            "mesh_lb_packets_total{kind=\"published\",port=\"8080\",protocol=\"tcp\",service=\"web\"}",
        );
        packets.is_some_and(|p| p > 0.0)
    });
    assert!(text.contains("lb_backend=\"ipvs\""), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("mesh_lb_backend_connections_total{service=\"web\",task=")),
        "IPVS counts the local task's connections:\n{text}"
    );

    // The node's own connections to its published port: they loop back
    // through prerouting, where the client mark is set.
    let (failures, per_task) = swarm.cluster.host(0).run(|| {
        let mut failures = Vec::new();
        let mut per_task = std::collections::BTreeMap::new();
        for _ in 0..12 {
            match mesh_tests::mesh::http_get((host_address(0), 8080).into()) {
                Ok((task, _)) => *per_task.entry(task).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
        (failures, per_task)
    });
    println!("node 0 -> its own 8080: {per_task:?}");
    assert!(failures.is_empty(), "the node's own connections: {failures:?}");
    assert!(per_task.len() >= 2, "its own connections spread: {per_task:?}");

    // The agent is down: the kernel keeps forwarding; restarted, it takes
    // the services over as they are.
    swarm.kill(1);
    let (failures, _, _) = spray(&swarm, CLIENT, 3, 8080, 5);
    assert!(
        failures.is_empty(),
        "failed requests while agent 1 was down: {failures:?}"
    );
    swarm.start(1);
    std::thread::sleep(Duration::from_secs(3));
    let (failures, _, _) = spray(&swarm, CLIENT, 3, 8080, 5);
    assert!(
        failures.is_empty(),
        "failed requests after agent 1 restarted: {failures:?}"
    );
    assert_eq!(ipvs_on(&swarm, 1).len(), 2, "the restarted agent keeps its services");

    // Affinity: one client, one task per entry node.
    mesh_tests::mesh::create_http_service(
        &swarm,
        "sticky",
        &[
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--lb-affinity",
            "client-ip",
            "--publish",
            "8181:80",
        ],
    );
    swarm.wait("3 sticky tasks running", CONVERGE, || running(&swarm, "sticky") == 3);
    for host in 0..3 {
        swarm.wait("IPVS services hashing the client address", CONVERGE, || {
            let services = ipvs_on(&swarm, host);
            services.len() == 4
                && services.values().filter(|s| s.schedule.scheduler_flags == 0).count() == 2
                && real_servers(&swarm, host).len() == 6
        });
    }
    swarm.wait("every node's 8181 answers", CONVERGE, || {
        spray(&swarm, CLIENT, 3, 8181, 1).0.is_empty()
    });
    for node in 0..3 {
        let (failures, per_task) = swarm.cluster.host(CLIENT).run(move || {
            let mut failures = Vec::new();
            let mut per_task = std::collections::BTreeMap::new();
            for _ in 0..8 {
                match mesh_tests::mesh::http_get((host_address(node), 8181).into()) {
                    Ok((task, _)) => *per_task.entry(task).or_insert(0) += 1,
                    Err(e) => failures.push(e),
                }
            }
            (failures, per_task)
        });
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            per_task.len(),
            1,
            "entering by node {node}, the client stays on one task: {per_task:?}"
        );
    }
    swarm.ok(0, &["service", "rm", "sticky"]);

    // Scale down: the task that stops leaves every node's IPVS, and the
    // port keeps answering from the two left.
    swarm.ok(0, &["service", "scale", "web=2"]);
    swarm.wait("2 web tasks running", CONVERGE, || running(&swarm, "web") == 2);
    for host in 0..3 {
        swarm.wait("sticky gone, and the stopped task gone from IPVS", CONVERGE, || {
            let servers = real_servers(&swarm, host);
            // The node without a task: two other nodes; the others: their
            // task and one other node.
            let services = ipvs_on(&swarm, host);
            servers.len() == 2
                && services.len() == 2
                && services.values().all(|s| s.dests.values().all(|d| d.weight > 0))
        });
    }
    let (failures, per_task, _) = spray(&swarm, CLIENT, 3, 8080, 10);
    assert!(failures.is_empty(), "failed requests after scaling down: {failures:?}");
    assert_eq!(per_task.len(), 2, "the two tasks left serve: {per_task:?}");

    // Switching backend is a restart away: host 2 comes back on eBPF and
    // drops its IPVS services and marks.
    swarm.kill(2);
    swarm.set_flags(EBPF_FLAGS);
    swarm.start(2);
    swarm.wait("host 2 on eBPF: no IPVS service, no marks, a tunnel", CONVERGE, || {
        ipvs_on(&swarm, 2).is_empty() && !has_mark_table(&swarm, 2) && has_link(&swarm, 2, TUNNEL_DEVICE)
    });

    swarm.ok(0, &["service", "rm", "web"]);
    for host in 0..2 {
        swarm.wait("IPVS services and marks removed", CONVERGE, || {
            ipvs_on(&swarm, host).is_empty() && !has_mark_table(&swarm, host)
        });
    }
}
