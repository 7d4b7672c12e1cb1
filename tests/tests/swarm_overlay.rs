//! Kernel lane: the overlay dataplane. Tasks of one service on
//! three nodes reach each other over VXLAN by TCP and UDP; two overlays
//! are isolated; the static FDB and neighbour entries follow tasks and
//! nodes as they come and go.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use mesh_agent::{agent::net::overlay::task_mac, dataplane::vxlan};
use mesh_tests::{
    overlay::{endpoints, has_link, in_task, inspect, overlays_on, running},
    require_root,
    swarm::{binary, Swarm},
};

const CONVERGE: Duration = Duration::from_secs(30);
const PORT: u16 = 7000;

fn vni(swarm: &Swarm, network: &str) -> u32 {
    inspect(swarm, network)["network"]["vni"].as_u64().unwrap() as u32
}

/// Connects to a task's echo server: the greeting names the task, and a
/// line comes back as sent.
fn tcp_echo(address: Ipv4Addr) -> Result<String, String> {
    let to = SocketAddr::from((address, PORT));
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| format!("{to}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).map_err(|e| e.to_string())?;
    (&stream).write_all(b"over the overlay\n").map_err(|e| e.to_string())?;
    let mut back = String::new();
    reader.read_line(&mut back).map_err(|e| e.to_string())?;
    if back != "over the overlay\n" {
        return Err(format!("echoed {back:?}"));
    }
    Ok(greeting.trim().to_string())
}

/// One UDP datagram to a task's echo server; the reply names the task.
fn udp_echo(address: Ipv4Addr) -> Result<String, String> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 1500];
    // UDP may lose the first datagram while ARP resolves; a few tries.
    for _ in 0..6 {
        socket
            .send_to(b"datagram", (address, PORT))
            .map_err(|e| e.to_string())?;
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let (name, body) = text.split_once(' ').ok_or(format!("reply {text:?}"))?;
            assert_eq!(body, "datagram");
            return Ok(name.to_string());
        }
    }
    Err(format!("no UDP reply from {address}"))
}

/// The VTEPs host `host` sends network `vni`'s frames to, per remote MAC.
fn fdb_on(swarm: &Swarm, host: usize, vni: u32) -> BTreeMap<[u8; 6], IpAddr> {
    overlays_on(swarm, host).remove(&vni).map(|s| s.fdb).unwrap_or_default()
}

#[test]
fn tasks_on_three_nodes_talk_over_vxlan_isolated_per_network_with_entries_that_follow_them() {
    require_root();
    let mut swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.join(2, 0, "worker");
    swarm.wait("3 nodes ready", CONVERGE, || swarm.ready(0) == 3);
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    let port = PORT.to_string();

    swarm.ok(0, &["network", "create", "--attachable", "app"]);
    swarm.ok(0, &["network", "create", "other"]);
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--mode",
            "global",
            "--name",
            "echo",
            "--network",
            "app",
            "--",
            echo,
            &port,
        ],
    );
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "lone",
            "--network",
            "other",
            "--",
            echo,
            &port,
        ],
    );
    swarm.wait("echo on 3 nodes, lone on 1", CONVERGE, || {
        running(&swarm, "echo") == 3 && running(&swarm, "lone") == 1
    });
    let app = vni(&swarm, "app");
    let on_app = endpoints(&swarm, "app");
    assert_eq!(on_app.len(), 3, "{on_app:?}");
    let host_of = |node: &str| node.trim_start_matches('h').parse::<usize>().unwrap();
    let (here_task, _, _) = on_app.iter().find(|(_, n, _)| n == "h0").expect("a task on h0").clone();

    // TCP and UDP from h0's task to the tasks on h1 and h2, through VXLAN.
    for (task, node, address) in on_app.iter().filter(|(_, n, _)| n != "h0") {
        let address = *address;
        let (tcp, udp) = in_task(&swarm, 0, &here_task, move || (tcp_echo(address), udp_echo(address)));
        assert_eq!(tcp.as_deref(), Ok(task.as_str()), "TCP to {node}'s task at {address}");
        assert_eq!(udp.as_deref(), Ok(task.as_str()), "UDP to {node}'s task at {address}");
    }

    // Each node has exactly the other nodes' endpoints, statically.
    for host in 0..3 {
        let want: BTreeMap<[u8; 6], IpAddr> = on_app
            .iter()
            .filter(|(_, n, _)| host_of(n) != host)
            .map(|(_, n, a)| (task_mac(*a), IpAddr::V4(swarm.cluster.host(host_of(n)).address())))
            .collect();
        let state = overlays_on(&swarm, host)
            .remove(&app)
            .expect("the app network on every node");
        assert_eq!(state.fdb, want, "h{host}'s FDB for app");
        assert_eq!(state.neighbours.len(), 2, "h{host}'s neighbours for app");
        assert_eq!(state.mtu, 1450, "the underlay's 1500 minus VXLAN's 50");
    }

    // The other overlay is a separate segment: no entry for its task on
    // app, and app's tasks cannot reach it.
    let on_other = endpoints(&swarm, "other");
    let (_, lone_node, lone_address) = on_other[0].clone();
    for host in 0..3 {
        assert!(
            !fdb_on(&swarm, host, app).contains_key(&task_mac(lone_address)),
            "h{host}'s app FDB knows nothing of other"
        );
    }
    let reached = in_task(&swarm, 0, &here_task, move || tcp_echo(lone_address));
    assert!(reached.is_err(), "app reached {lone_address} on other (on {lone_node})");

    // A one-off on an attachable network reaches the service's tasks,
    // streams its output and leaves nothing behind.
    let (far_task, _, far_address) = on_app.iter().find(|(_, n, _)| n == "h2").cloned().unwrap();
    let script = format!("echo from-a-one-off | busybox nc -w 3 {far_address} {PORT}");
    let out = swarm.ok(0, &["run", "--network", "app", "--", "sh", "-c", &script]);
    assert!(out.contains(&far_task) && out.contains("from-a-one-off"), "{out}");
    let (code, err) = swarm.fails(0, &["run", "--network", "app", "--", "false"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("failed"), "{err}");
    let (code, err) = swarm.fails(0, &["run", "--network", "other", "--", "true"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not attachable"), "{err}");
    assert_eq!(
        swarm.ok(0, &["service", "ls", "-q"]).lines().count(),
        2,
        "only echo and lone remain"
    );

    // Restarting h1's agent (SIGKILL, as a crash would) interrupts
    // nothing: a TCP stream from h0's task to h1's task carries on, the
    // same tasks run, and h1's kernel objects are adopted as they are.
    let (peer_task, _, peer_address) = on_app.iter().find(|(_, n, _)| n == "h1").cloned().unwrap();
    let stream = in_task(&swarm, 0, &here_task, move || {
        TcpStream::connect_timeout(&SocketAddr::from((peer_address, PORT)), Duration::from_secs(2))
    })
    .expect("a stream to h1's task");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), peer_task);
    // The one-offs' endpoints leave h1 a moment after they end: what is
    // compared is h1 with the service's entries alone.
    let settled: BTreeMap<[u8; 6], IpAddr> = on_app
        .iter()
        .filter(|(_, n, _)| n != "h1")
        .map(|(_, n, a)| (task_mac(*a), IpAddr::V4(swarm.cluster.host(host_of(n)).address())))
        .collect();
    swarm.wait("h1's app entries without the one-offs'", CONVERGE, || {
        fdb_on(&swarm, 1, app) == settled
    });
    let h1_before = overlays_on(&swarm, 1);
    swarm.kill(1);
    swarm.start(1);
    swarm.wait("h1's agent back in the swarm", CONVERGE, || {
        let log = std::fs::read_to_string(&swarm.agents[1].log).unwrap_or_default();
        log.lines()
            .any(|l| l.contains(&format!("task {peer_task} ")) && l.contains("adopted"))
    });
    for round in 0..3 {
        let text = format!("still here {round}\n");
        (&stream)
            .write_all(text.as_bytes())
            .expect("the stream survives the restart");
        line.clear();
        reader.read_line(&mut line).expect("an echo after the restart");
        assert_eq!(line, text);
        std::thread::sleep(Duration::from_millis(300));
    }
    let on_app_after = endpoints(&swarm, "app");
    assert_eq!(on_app_after, on_app, "the same tasks, not replacements");
    assert_eq!(running(&swarm, "echo"), 3);
    assert_eq!(
        overlays_on(&swarm, 1),
        h1_before,
        "h1's overlay entries are as they were"
    );
    drop((reader, stream));

    // Draining h2 stops its task: its entries leave h0 and h1, and h2
    // keeps no overlay it has no task on.
    let h2 = IpAddr::V4(swarm.cluster.host(2).address());
    swarm.ok(0, &["node", "update", "--availability", "drain", "h2"]);
    swarm.wait("h2's endpoint gone from h0 and h1", CONVERGE, || {
        (0..2).all(|h| !fdb_on(&swarm, h, app).values().any(|v| *v == h2))
    });
    swarm.wait("h2 without the app network", CONVERGE, || {
        !overlays_on(&swarm, 2).contains_key(&app)
    });
    assert!(
        !has_link(&swarm, 2, &vxlan::bridge_name(app)),
        "h2's app bridge is removed too"
    );

    // h1 leaves the swarm: its endpoint leaves h0, and h1 keeps nothing.
    swarm.ok(1, &["swarm", "leave"]);
    swarm.wait("h1's endpoint gone from h0", CONVERGE, || {
        fdb_on(&swarm, 0, app).is_empty()
    });
    assert!(overlays_on(&swarm, 1).is_empty(), "h1 left no overlay behind");
}
