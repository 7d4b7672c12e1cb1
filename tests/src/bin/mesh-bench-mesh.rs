//! `cargo xtask bench mesh`: the routing mesh's figures (release binaries), each a
//! ratio measured in one run.
//!
//! - HTTP through a published port: wrk on node A (the figure),
//!   then on a client host outside the swarm, against node A's published
//!   port, the only task running on node B; straight to that task's
//!   address (direct, over a route via B); and against a kube-proxy-style
//!   reference on node A (nftables DNAT to the task + masquerade). All
//!   three reach the same server in the same task. Requests/s and p99 of
//!   each, the medians of `--rounds` (3) rounds that run the three paths
//!   in turn; the server closes every connection, so each request is a new
//!   connection through the load balancer.
//! - ns per packet of `tc_ingress` under BPF_PROG_TEST_RUN (Katran's
//!   method): a tracked connection to a task on another node (on the link,
//!   and through the tunnel), and a miss.
//! - Programming cost: one backend change at 10 services vs at 10,000
//!   services of 10 backends, written to real kernel maps.
//! - Convergence: a task killed -> gone from every node's maps (read from
//!   the kernel), over `--trials` kills (20) on 3 nodes; p50 and p99.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::{
    agent::{
        mesh::kernel::{MeshTables, PROGRAM_INGRESS},
        tasks::supervisor::task_dir_name,
    },
    api::{
        assignment::mesh::{MeshAssignment, MeshBackend, MeshService},
        service::{LbOptions, PortPublish},
    },
    dataplane::{ebpf::EbpfDataplane, lb::LbMaps, netlink::Netlink},
};
use mesh_common::lb::NodeConfig;
use mesh_tests::{
    cluster::host_address,
    mesh::{backends_on, http_get},
    overlay::{in_task, running},
    packet, require_root,
    swarm::{binary, Swarm},
    test_run::test_run,
};

use mesh_tests::process::processes_with;

const USAGE: &str =
    "usage: mesh-bench-mesh [--trials N] [--seconds N] [--rounds N] [--only per-packet|programming|http|convergence]";
const CLIENT: usize = 2;
/// Node A: the manager, where the published port is asked.
const NODE_A: usize = 0;
const NFT_PORT: u16 = 9080;
const CONVERGE: Duration = Duration::from_secs(30);

fn main() {
    require_root();
    let (mut trials, mut seconds, mut rounds, mut only) = (20usize, 5u32, 3usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--trials", Some(n)) => trials = n.parse().expect(USAGE),
            ("--seconds", Some(n)) => seconds = n.parse().expect(USAGE),
            ("--rounds", Some(n)) => rounds = n.parse::<usize>().expect(USAGE).max(1),
            ("--only", Some(which)) => only = Some(which),
            _ => panic!("{USAGE}"),
        }
    }
    let run = |which: &str| only.as_deref().is_none_or(|o| o == which);
    if run("per-packet") {
        per_packet();
    }
    if run("programming") {
        programming_cost();
    }
    if run("http") {
        let swarm = Swarm::new(3);
        swarm.form(2);
        http(&swarm, seconds, rounds);
    }
    if run("convergence") {
        let swarm = Swarm::new(3);
        swarm.form(3);
        convergence(&swarm, trials);
    }
}

/// wrk's requests/s and p99 (microseconds) against `url` from the client.
fn wrk(swarm: &Swarm, from: usize, url: &str, seconds: u32) -> (f64, f64) {
    let mut command = Command::new("wrk");
    command.args(["-t2", "-c32", &format!("-d{seconds}s"), "--latency", url]);
    let out = swarm
        .cluster
        .host(from)
        .output(command, Duration::from_secs(u64::from(seconds) + 30))
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "wrk {url}: no Requests/sec in {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| micros(v.trim()))
        .unwrap_or_else(|| panic!("wrk {url}: no 99% in {text}"));
    let errors = text
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"));
    if let Some(e) = errors {
        println!("   wrk {url}: {}", e.trim());
    }
    (rps, p99)
}

/// wrk's "1.23ms" / "456.00us" / "1.2s" in microseconds.
fn micros(v: &str) -> f64 {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    number.parse::<f64>().expect("a wrk latency") * scale
}

fn http(swarm: &Swarm, seconds: u32, rounds: usize) {
    let (a, b) = (host_address(0), host_address(1));
    mesh_tests::mesh::create_http_service(
        swarm,
        "web",
        &["--constraint", "node.role==worker", "--publish", "8080:80"],
    );
    swarm.wait("the web task running on B", CONVERGE, || running(swarm, "web") == 1);
    // The task's address on B's bridge: the direct path and the nftables
    // reference reach the same server in the same namespace, over a /32
    // route via B (A's own bridge holds the same pool).
    let (task, id) = task_address(swarm, 1, "web");
    // Runs after runs reuse client ports against the server's TIME_WAIT
    // sockets, and a SYN whose timestamp is older than the one the
    // TIME_WAIT socket kept is refused (PAWS): the client retries a second
    // later. Timestamp offsets differ per path (they hash the addresses the
    // socket sees), so a run would pay for the one before. The server keeps
    // no TIME_WAIT sockets, so every run starts clean.
    in_task(swarm, 1, &task_dir_name(id), || {
        std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", "0").expect("no TIME_WAIT in the task")
    });
    let route = |host: usize| {
        let mut ip = Command::new("ip");
        ip.args(["-4", "route", "replace", &format!("{task}/32"), "via", &b.to_string()]);
        let out = swarm
            .cluster
            .host(host)
            .output(ip, Duration::from_secs(10))
            .expect("ip route");
        assert!(
            out.status.success(),
            "ip route: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    route(CLIENT);
    route(0);
    let rules = format!(
        "table ip meshbench {{
            chain pre {{ type nat hook prerouting priority -100; tcp dport {NFT_PORT} dnat to {task}:80; }}
            chain out {{ type nat hook output priority -100; ip daddr {a} tcp dport {NFT_PORT} dnat to {task}:80; }}
            chain post {{ type nat hook postrouting priority 100; ip daddr {task} tcp dport 80 masquerade; }}
        }}"
    );
    let nft = swarm.cluster.host(0).run(move || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding on A");
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        child.wait().expect("nft")
    });
    assert!(nft.success(), "nft -f failed");
    for from in [NODE_A, CLIENT] {
        for (what, to) in [
            ("direct", SocketAddr::from((task, 80))),
            ("nftables", SocketAddr::from((a, NFT_PORT))),
            ("A's 8080", SocketAddr::from((a, 8080))),
        ] {
            swarm.wait(what, CONVERGE, || {
                swarm.cluster.host(from).run(move || http_get(to).is_ok())
            });
        }
    }
    // The figure: the client on node A (its connections to A's
    // published port are balanced at the socket), the task on node B. Then
    // a client outside the swarm, entering by A (tc_ingress).
    let placements = [
        (NODE_A, "the client on node A"),
        (CLIENT, "a client outside the swarm, entering by A"),
    ];
    // Rounds of the three paths, each placement in turn, so a slow spell
    // of the machine weighs on all three alike; the medians make the
    // figure. Before each run off the mesh, B forgets the connections the
    // mesh routed: a connection that reuses a client address and port the
    // mesh routed (the nftables reference masquerades to A's address)
    // would meet that connection's reverse-NAT entry on B on the way back
    // (the mesh owns the task's routed replies; in a swarm nothing but the
    // mesh reaches a task on another node).
    let urls = [
        format!("http://{task}:80/"),
        format!("http://{a}:{NFT_PORT}/"),
        format!("http://{a}:8080/"),
    ];
    const MESH: usize = 2;
    // [placement][path] -> one (req/s, p99) per round.
    let mut runs = vec![vec![Vec::new(); urls.len()]; placements.len()];
    for round in 0..rounds {
        for (p, (from, _)) in placements.iter().enumerate() {
            for (u, url) in urls.iter().enumerate() {
                if u != MESH {
                    mesh_tests::mesh::forget_routed_connections(swarm, 1);
                }
                runs[p][u].push(wrk(swarm, *from, url, seconds));
            }
            let [direct, reference, mesh] = [0, 1, 2].map(|u| runs[p][u][round].0);
            println!(
                "   round {}, {}: direct {direct:.0}, nftables {reference:.0}, mesh {mesh:.0} req/s (mesh/nftables {:.2})",
                round + 1,
                placements[p].1,
                mesh / reference
            );
        }
    }
    for (p, (_, placement)) in placements.iter().enumerate() {
        let [direct, reference, mesh] = [0, 1, 2].map(|u| medians(&runs[p][u]));
        println!(
            "== HTTP, a new connection per request (wrk -t2 -c32 -d{seconds}s, median of {rounds} rounds), {placement}, the task on B"
        );
        println!(
            "   published port on A:                {:>9.0} req/s, p99 {:>8.0} us",
            mesh.0, mesh.1
        );
        println!(
            "   straight to the task's address:     {:>9.0} req/s, p99 {:>8.0} us",
            direct.0, direct.1
        );
        println!(
            "   nftables DNAT+masquerade on A:      {:>9.0} req/s, p99 {:>8.0} us",
            reference.0, reference.1
        );
        println!(
            "   mesh/direct: throughput {:.2} (target >= 0.9), p99 {:.2}; mesh/nftables: throughput {:.2} (target >= 1.2), p99 {:.2}",
            mesh.0 / direct.0,
            mesh.1 / direct.1,
            mesh.0 / reference.0,
            mesh.1 / reference.1
        );
    }
}

/// The medians of the requests/s and of the p99s.
fn medians(runs: &[(f64, f64)]) -> (f64, f64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    (
        median(runs.iter().map(|r| r.0).collect()),
        median(runs.iter().map(|r| r.1).collect()),
    )
}

/// The address of `service`'s task on host `host`'s bridge, and its ID.
fn task_address(swarm: &Swarm, host: usize, service: &str) -> (Ipv4Addr, u64) {
    let out = swarm.ok(0, &["service", "ps", service, "--format", "json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let id = tasks
        .iter()
        .find(|t| t["task"]["state"] == "Running")
        .and_then(|t| t["task"]["id"].as_u64())
        .expect("a running task");
    let addresses = in_task(swarm, host, &task_dir_name(id), || {
        Netlink::run(|nl| async move { nl.global_addresses().await }).expect("its addresses")
    });
    addresses
        .into_iter()
        .find_map(|a| match a {
            std::net::IpAddr::V4(v4) if v4.octets()[0] == 172 => Some((v4, id)),
            _ => None,
        })
        .expect("an address on the bridge")
}

fn service(id: u64, backends: impl Iterator<Item = u64>) -> MeshService {
    let mut s = MeshService {
        service: id,
        name: format!("s{id}"),
        ports: vec![PortPublish::parse(&format!("{}:80", 10_000 + id)).unwrap()],
        lb: LbOptions::default(),
        backends: backends
            .map(|task| MeshBackend {
                task,
                node_addr: "192.0.2.2".into(),
                local: false,
            })
            .collect(),
        runs_here: false,
        digest: 0,
    };
    s.digest = s.content_digest();
    s
}

fn loaded() -> (EbpfDataplane, LbMaps, MeshTables) {
    let mut dataplane = EbpfDataplane::load().expect("load mesh-ebpf");
    let mut maps = LbMaps::take(&mut dataplane).expect("the maps");
    maps.set_config(NodeConfig {
        addr: u32::from_ne_bytes([192, 0, 2, 1]),
        ifindex: 1,
        tunnel_ifindex: 1,
        bridge_ifindex: 1,
    })
    .expect("config");
    (dataplane, maps, MeshTables::default())
}

/// ns per packet of tc_ingress for a tracked connection to a task on
/// another node (on the link, or through the tunnel), and for a miss.
fn per_packet() {
    let repeat = 1_000_000;
    let hit = packet::tcp4_syn(
        (Ipv4Addr::new(198, 51, 100, 7), 40000),
        (Ipv4Addr::new(192, 0, 2, 1), 10_001),
        1,
    );
    let miss = packet::tcp4_syn(
        (Ipv4Addr::new(198, 51, 100, 7), 40000),
        (Ipv4Addr::new(192, 0, 2, 1), 22),
        1,
    );
    let measure = |on_link: bool| {
        let (dataplane, mut maps, mut tables) = loaded();
        let mesh = MeshAssignment {
            services: vec![service(1, 1..=10)],
            peers: vec!["192.0.2.2".into()],
        };
        maps.apply(&tables.update(&mesh, &BTreeMap::new(), &|_| on_link))
            .expect("write");
        let fd = dataplane.program_fd(PROGRAM_INGRESS).expect("fd");
        let hit_ns = test_run(fd, &hit, repeat).expect("test run").duration_ns;
        let miss_ns = test_run(fd, &miss, repeat).expect("test run").duration_ns;
        (hit_ns, miss_ns)
    };
    let (direct, miss) = measure(true);
    let (tunnel, _) = measure(false);
    println!("== tc_ingress under BPF_PROG_TEST_RUN ({repeat} runs each)");
    println!(
        "   published port, tracked connection to a task on a node on the link: {direct} ns/packet (target <= 100)"
    );
    println!("   the same through the tunnel (a node off the link):                  {tunnel} ns/packet");
    println!("   a port nothing publishes (passed to the kernel):                    {miss} ns/packet");
}

/// Median time of one backend change (a task leaves, then comes back)
/// with `n` services of 10 backends loaded: (loading them, the whole
/// change, its map writes alone).
fn one_change(n: u64) -> (Duration, Duration, Duration) {
    let (_dataplane, mut maps, mut tables) = loaded();
    let mut mesh = MeshAssignment {
        services: (1..=n).map(|s| service(s, (s * 100 + 1)..=(s * 100 + 10))).collect(),
        peers: vec!["192.0.2.2".into()],
    };
    let start = Instant::now();
    maps.apply(&tables.update(&mesh, &BTreeMap::new(), &|_| false))
        .expect("load");
    let load = start.elapsed();
    let mut times = Vec::new();
    for i in 0..40 {
        let changed = &mut mesh.services[(n as usize) / 2];
        if i % 2 == 0 {
            changed.backends.pop();
        } else {
            let next = changed.backends.last().unwrap().task + 1;
            changed.backends.push(MeshBackend {
                task: next,
                node_addr: "192.0.2.2".into(),
                local: false,
            });
        }
        // The manager's side of the change.
        changed.digest = changed.content_digest();
        let start = Instant::now();
        let changes = tables.update(&mesh, &BTreeMap::new(), &|_| false);
        let planned = start.elapsed();
        maps.apply(&changes).expect("change");
        times.push((start.elapsed(), start.elapsed() - planned));
    }
    times.sort();
    let (total, writes) = times[times.len() / 2];
    (load, total, writes)
}

fn programming_cost() {
    let (_, small, small_writes) = one_change(10);
    let (load, large, large_writes) = one_change(10_000);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("== Programming cost (10 backends per service, real kernel maps; median of 40 changes)");
    println!("   loading 10,000 services: {:.2} s", load.as_secs_f64());
    println!(
        "   one backend change (plan + map writes): {:.0} us at 10 services, {:.0} us at 10,000; ratio {:.2} (target <= 2)",
        us(small),
        us(large),
        us(large) / us(small)
    );
    println!(
        "   its map writes alone: {:.0} us at 10 services, {:.0} us at 10,000; ratio {:.2}",
        us(small_writes),
        us(large_writes),
        us(large_writes) / us(small_writes)
    );
}

fn convergence(swarm: &Swarm, trials: usize) {
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    let marker = format!("mesh-bench-converge-{}", std::process::id());
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "conv",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--restart-delay",
            "1s",
            "--publish",
            "8080:80",
            "--",
            echo,
            "--http",
            "80",
            &marker,
        ],
    );
    let full = || (0..3).all(|h| backends_on(swarm, h).is_some_and(|b| b.len() == 3));
    let mut times = Vec::new();
    for _ in 0..trials {
        swarm.wait("3 backends on every node", CONVERGE, || {
            running(swarm, "conv") == 3 && full()
        });
        let victim = processes_with(&marker)[0];
        let killed = Instant::now();
        // SAFETY: kill has no memory preconditions; the PID is a task's.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        loop {
            if (0..3).all(|h| backends_on(swarm, h).is_some_and(|b| b.len() == 2)) {
                times.push(killed.elapsed());
                break;
            }
            if killed.elapsed() > CONVERGE {
                panic!("the killed task stayed in the maps for {CONVERGE:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    times.sort();
    let pick = |q: f64| {
        times[((times.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(times.len() - 1)]
    };
    println!("== Convergence: task killed -> gone from every node's maps, {trials} trials on 3 nodes");
    println!(
        "   p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < 500 ms)",
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3
    );
}
