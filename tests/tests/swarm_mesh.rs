//! Kernel lane: the routing mesh. A 3-replica HTTP service
//! published on 8080 answers on every node's address, every task serves
//! some of the requests, the tasks see the client's own address, a UDP
//! port works the same, and the programs and tunnel device go away with
//! the last published port.
//!
//! Hosts 0-2 form the swarm; host 3's agent never joins: it is the client,
//! outside the cluster, on the same underlay. The first scenario reaches
//! tasks on other nodes on the link directly, the second through the
//! routing-mesh tunnel (`--mesh-routing tunnel`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use mesh_agent::agent::{mesh::kernel::TUNNEL_DEVICE, net::netns::NetNs, tasks::supervisor::task_dir_name};
use mesh_tests::{
    cluster::host_address,
    mesh::{backends_on, bridge_frames, http_get},
    overlay::{has_link, running},
    require_root,
    swarm::{binary, Swarm, TUNNEL_AGENT_FLAGS},
};

use mesh_tests::process::processes_with;

const CONVERGE: Duration = Duration::from_secs(30);
const CLIENT: usize = 3;
const REQUESTS_PER_NODE: usize = 30;

/// `n` requests to each node's published port, from the client host.
fn spray(swarm: &Swarm, port: u16, n: usize) -> (Vec<String>, BTreeMap<String, usize>, Vec<String>) {
    mesh_tests::mesh::spray(swarm, CLIENT, 3, port, n)
}

/// Checks that `requests` through published ports, between two readings
/// of [`bridge_frames`], went into their tasks and back out past the task
/// bridge: each takes at least three frames each way (handshake, request,
/// close), so through the bridge the counts would grow by more than
/// three times `requests`; a few frames of the tasks' own (ARP) may.
fn assert_past_the_bridge(before: (u64, u64), after: (u64, u64), requests: usize) {
    // A task that ended in between takes its veth's counts with it: its
    // part shrinks, it cannot grow (nothing can reach a task that is gone).
    let (replies, into_tasks) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
    println!("over {requests} requests: {replies} frames up the bridge, {into_tasks} into tasks through it");
    assert!(
        into_tasks < requests as u64,
        "requests reach tasks through the bridge ({into_tasks} frames for {requests} requests), not straight into their namespace"
    );
    assert!(
        replies < requests as u64,
        "replies go up the bridge ({replies} frames for {requests} requests), not straight out of the task's veth"
    );
}

/// One request from a node to a published port: the task that answered,
/// after checking the socket's peer is the address it asked for.
fn node_get(to: SocketAddr) -> Result<String, String> {
    let peer = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .and_then(|s| s.peer_addr())
        .map_err(|e| format!("{to}: {e}"))?;
    if peer != to {
        return Err(format!("connected to {to}, the socket's peer is {peer}"));
    }
    http_get(to).map(|(task, _)| task)
}

fn udp_ask(to: SocketAddr) -> Result<String, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..6 {
        socket.send_to(b"datagram", to).map_err(|e| e.to_string())?;
        if let Ok(n) = socket.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    Err(format!("no UDP reply from {to}"))
}

#[test]
fn a_published_port_answers_on_every_node_from_every_task_and_tasks_see_the_client() {
    require_root();
    let mut swarm = Swarm::new(4);
    swarm.form(3);
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
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
    for host in 0..3 {
        swarm.wait("the routing-mesh tunnel device", CONVERGE, || {
            has_link(&swarm, host, TUNNEL_DEVICE)
        });
    }
    assert!(!has_link(&swarm, CLIENT, TUNNEL_DEVICE), "the client is no node");
    // Running in the store is not yet in every node's tables: each node
    // programs a task once it hears of it.
    swarm.wait("every node's tables hold the 3 tasks", CONVERGE, || {
        (0..3).all(|h| backends_on(&swarm, h).is_some_and(|b| b.len() == 3))
    });

    // Every node answers, whichever task serves; the tasks see the client.
    let mut settled = false;
    swarm.wait("every node's 8080 answers", CONVERGE, || {
        let (failures, _, _) = spray(&swarm, 8080, 3);
        settled = failures.is_empty();
        settled
    });
    let before = bridge_frames(&swarm, 3);
    let (failures, per_task, seen) = spray(&swarm, 8080, REQUESTS_PER_NODE);
    println!(
        "requests per task over {} requests: {per_task:?}",
        3 * REQUESTS_PER_NODE
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_past_the_bridge(before, bridge_frames(&swarm, 3), 3 * REQUESTS_PER_NODE);
    assert_eq!(per_task.len(), 3, "every task serves some requests: {per_task:?}");
    assert_eq!(
        seen,
        vec![host_address(CLIENT).to_string()],
        "the tasks see the client's own address, not a node's"
    );
    let logs = swarm.ok(0, &["service", "logs", "web"]);
    assert!(
        logs.contains(&format!("access {}", host_address(CLIENT))),
        "the access log shows the client: {logs}"
    );

    // The nodes' own connections: to their own address and 127.0.0.1
    // (socket-level, every task reachable), and to another node's address.
    for (from, to) in [(0, host_address(0)), (1, Ipv4Addr::LOCALHOST), (2, host_address(0))] {
        let (failures, per_task) = swarm.cluster.host(from).run(move || {
            let to = SocketAddr::from((to, 8080));
            let mut failures = Vec::new();
            let mut per_task = BTreeMap::new();
            for _ in 0..30 {
                match node_get(to) {
                    Ok(task) => *per_task.entry(task).or_insert(0) += 1,
                    Err(e) => failures.push(e),
                }
            }
            (failures, per_task)
        });
        println!("node {from} -> {to}:8080, requests per task: {per_task:?}");
        assert!(failures.is_empty(), "node {from} -> {to}:8080: {failures:?}");
        if from != 2 {
            assert_eq!(per_task.len(), 3, "node {from} reaches every task: {per_task:?}");
        }
    }

    // UDP through the mesh.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "dns",
            "--replicas",
            "2",
            "--publish",
            "5353:7000/udp",
            "--",
            echo,
            "7000",
        ],
    );
    swarm.wait("2 udp tasks running", CONVERGE, || running(&swarm, "dns") == 2);
    for node in 0..3 {
        let to = SocketAddr::from((host_address(node), 5353));
        let mut reply = Err(String::new());
        swarm.wait("a UDP answer", CONVERGE, || {
            reply = swarm.cluster.host(CLIENT).run(move || udp_ask(to));
            reply.is_ok()
        });
        let reply = reply.unwrap();
        assert!(reply.ends_with(" datagram"), "{reply:?}");
    }

    // Agents restarted under load (killed, as a crash or an upgrade would
    // stop them): their pinned programs and maps keep forwarding, and the
    // new agents take them over. Not one request fails.
    let client = NetNs::open(swarm.cluster.host(CLIENT).netns().name()).expect("the client's namespace");
    let load = std::thread::spawn(move || {
        client
            .run(|| {
                let start = std::time::Instant::now();
                let mut failures = Vec::new();
                let mut n = 0;
                // Bounded in count and time.
                while n < 1500 && start.elapsed() < Duration::from_secs(12) {
                    if let Err(e) = http_get(SocketAddr::from((host_address(n % 3), 8080))) {
                        failures.push(e);
                    }
                    n += 1;
                }
                (n, failures)
            })
            .expect("run in the client")
    });
    std::thread::sleep(Duration::from_millis(500));
    for host in [1, 2] {
        swarm.kill(host);
        std::thread::sleep(Duration::from_millis(300));
        swarm.start(host);
    }
    let (n, failures) = load.join().unwrap();
    println!("{n} requests while two agents restarted, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "failed requests across agent restarts: {failures:?}"
    );
    swarm.wait("the restarted nodes ready", CONVERGE, || swarm.ready(0) == 3);
    for host in [1, 2] {
        swarm.wait("the restarted agent took the pinned maps over", CONVERGE, || {
            std::fs::read_to_string(&swarm.agents[host].log).is_ok_and(|l| l.contains("routing mesh: taking over"))
        });
    }

    // Scaling down leaves no failed request once the tables follow.
    swarm.ok(0, &["service", "scale", "web=1"]);
    swarm.wait("1 web task running", CONVERGE, || running(&swarm, "web") == 1);
    swarm.wait("only one task answers", CONVERGE, || {
        let (failures, per_task, _) = spray(&swarm, 8080, 3);
        failures.is_empty() && per_task.len() == 1
    });

    // The last published port gone: nothing left of the mesh.
    swarm.ok(0, &["service", "rm", "web", "dns"]);
    for host in 0..3 {
        swarm.wait("the tunnel device removed", CONVERGE, || {
            !has_link(&swarm, host, TUNNEL_DEVICE)
        });
    }
    let refused = swarm
        .cluster
        .host(CLIENT)
        .run(|| http_get(SocketAddr::from((host_address(0), 8080))));
    assert!(refused.is_err(), "8080 must no longer answer: {refused:?}");
}

/// The slot of the task whose hostname is `hostname`.
fn slot_of(swarm: &Swarm, service: &str, hostname: &str) -> u64 {
    let out = swarm.ok(0, &["service", "ps", service, "--format", "json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    tasks
        .iter()
        .find(|t| t["task"]["id"].as_u64().map(task_dir_name).as_deref() == Some(hostname))
        .and_then(|t| t["task"]["slot"].as_u64())
        .unwrap_or_else(|| panic!("task {hostname} not in {out}"))
}

/// One line over an open echo connection, back as sent.
fn echo_line(stream: &mut TcpStream, line: &str) -> Result<(), String> {
    stream.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back).map_err(|e| e.to_string())?;
    (back == line.as_bytes())
        .then_some(())
        .ok_or(format!("echoed {:?}", String::from_utf8_lossy(&back)))
}

#[test]
fn connections_survive_scaling_affinity_sticks_and_a_killed_task_fails_requests_only_until_it_leaves_the_tables() {
    require_root();
    // Through the tunnel (the other test goes the on-link way), so both
    // ways between nodes are exercised.
    let swarm = Swarm::with_flags(4, TUNNEL_AGENT_FLAGS);
    swarm.form(3);
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    let marker = format!("mesh-test-kill-{}", std::process::id());
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--publish",
            "8080:80",
            "--",
            echo,
            "--http",
            "80",
            &marker,
        ],
    );
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "stream",
            "--replicas",
            "2",
            "--publish",
            "7070:7000",
            "--",
            echo,
            "7000",
        ],
    );
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
    swarm.wait("every task running", CONVERGE, || {
        running(&swarm, "web") == 3 && running(&swarm, "stream") == 2 && running(&swarm, "sticky") == 3
    });
    swarm.wait("every node's 8080 answers", CONVERGE, || {
        spray(&swarm, 8080, 2).0.is_empty()
    });

    // A long-lived connection through node 0 survives scaling up and down.
    let (mut stream, task) = swarm.cluster.host(CLIENT).run(|| {
        let to = SocketAddr::from((host_address(0), 7070));
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect to 7070");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte).expect("the greeting");
            greeting.push(byte[0]);
        }
        (stream, String::from_utf8_lossy(&greeting).trim().to_string())
    });
    echo_line(&mut stream, "before scaling\n").unwrap();
    swarm.ok(0, &["service", "scale", "stream=4"]);
    swarm.wait("4 stream tasks", CONVERGE, || running(&swarm, "stream") == 4);
    echo_line(&mut stream, "scaled up\n").expect("the connection survives scaling up");
    let keep = slot_of(&swarm, "stream", &task);
    let down = format!("stream={keep}");
    swarm.ok(0, &["service", "scale", &down]);
    swarm.wait("scaled down", CONVERGE, || running(&swarm, "stream") == keep as usize);
    echo_line(&mut stream, "scaled down\n").expect("the connection survives scaling down to its own task");
    drop(stream);

    // Affinity: one client, one task, whichever node it enters by.
    let before = bridge_frames(&swarm, 3);
    let (failures, per_task, _) = spray(&swarm, 8181, 10);
    assert!(failures.is_empty(), "{failures:?}");
    assert_past_the_bridge(before, bridge_frames(&swarm, 3), 30);
    assert_eq!(
        per_task.len(),
        1,
        "client-ip affinity keeps the client on one task: {per_task:?}"
    );

    // A task killed under load: requests fail only until every node's
    // tables have dropped it, and none after.
    let load = std::thread::scope(|scope| {
        let client = swarm.cluster.host(CLIENT);
        let load = scope.spawn(move || {
            client.run(|| {
                let start = std::time::Instant::now();
                let mut results = Vec::new();
                // Bounded in count and time.
                while results.len() < 3000 && start.elapsed() < Duration::from_secs(25) {
                    let node = results.len() % 3;
                    let ok = http_get(SocketAddr::from((host_address(node), 8080))).is_ok();
                    results.push((start.elapsed(), ok));
                    if start.elapsed() > Duration::from_secs(12) && results.iter().rev().take(200).all(|r| r.1) {
                        break;
                    }
                }
                (start, results)
            })
        });
        std::thread::sleep(Duration::from_secs(2));
        let victim = processes_with(&marker)[0];
        // Taken before the signal: a request that failed before this
        // instant did not fail because of the kill (taken after it, a
        // request failing while this thread waited to run again looked
        // as if it failed before the kill).
        let killed = std::time::Instant::now();
        // SAFETY: kill has no memory preconditions; the PID is a task's.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        swarm.wait("the kill recorded", CONVERGE, || running(&swarm, "web") < 3);
        let recorded = killed.elapsed();
        let (start, results) = load.join().unwrap();
        (start, killed, recorded, results)
    });
    let (start, killed, recorded, results) = load;
    let kill_at = killed.duration_since(start);
    let failed: Vec<Duration> = results.iter().filter(|r| !r.1).map(|r| r.0).collect();
    println!(
        "{} requests under load, {} failed, at {:?} (task killed at {kill_at:?}, the store knew {recorded:?} later)",
        results.len(),
        failed.len(),
        failed
    );
    assert!(
        failed.iter().all(|t| *t >= kill_at),
        "no request fails before the kill: {failed:?}"
    );
    let last = results.iter().rev().take(200).filter(|r| !r.1).count();
    assert_eq!(last, 0, "the last 200 requests, after convergence, all succeed");
}
