//! `cargo xtask demo`: the routing mesh on one machine. Four hosts in
//! network namespaces on one underlay bridge, a real `mesh-agent` on each:
//! h0 initialises a swarm, h1 and h2 join it, an overlay network and a
//! 3-replica HTTP service published on 8080 are created with `meshctl`,
//! then h3 (outside the swarm, a client) asks each node's 8080 and the
//! demo prints which task, on which node, answered. The swarm stays up
//! until Ctrl-C (`--once`: not at all); then everything is removed.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_tests::{
    cluster::host_address,
    mesh::{create_http_service, http_get, placed},
    overlay::running,
    require_root,
    swarm::Swarm,
};

const NODES: usize = 3;
const CLIENT: usize = 3;
const REQUESTS: usize = 4;

/// Runs `meshctl ARGS` on host `host`, printing the command and its output.
fn meshctl(swarm: &Swarm, host: usize, args: &[&str]) -> String {
    println!("h{host}$ meshctl {}", args.join(" "));
    let out = swarm.ok(host, args);
    for line in out.lines().take(12) {
        println!("     {line}");
    }
    out
}

fn main() -> Result<()> {
    let once = std::env::args().skip(1).any(|a| a == "--once");
    require_root();
    // Ctrl-C waits for the teardown instead of killing the demo mid-way:
    // the signals stay pending until the end (every thread inherits the mask).
    let signals = block_termination_signals();

    println!(
        "== mesh demo: {} hosts in network namespaces on one underlay bridge, a mesh-agent on each\n",
        NODES + 1
    );
    let swarm = Swarm::new(NODES + 1);
    for host in swarm.cluster.hosts() {
        let role = if host.index() == CLIENT {
            "a client, outside the swarm"
        } else {
            "a node"
        };
        println!(
            "  h{}  {:<12} namespace {:<24} {role}",
            host.index(),
            host.address(),
            host.netns().name()
        );
    }

    println!("\n== the swarm: h0 initialises it, h1 and h2 join");
    let addr = host_address(0).to_string();
    meshctl(
        &swarm,
        0,
        &[
            "swarm",
            "init",
            "--advertise-addr",
            &addr,
            "--dispatcher-heartbeat",
            "500ms",
        ],
    );
    let token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]);
    for i in 1..NODES {
        let me = host_address(i).to_string();
        let manager = format!("{addr}:2377");
        println!("h{i}$ meshctl swarm join --token <worker token> --advertise-addr {me} {manager}");
        swarm.ok(
            i,
            &[
                "swarm",
                "join",
                "--token",
                token.trim(),
                "--advertise-addr",
                &me,
                &manager,
            ],
        );
    }
    swarm.wait("3 nodes ready", Duration::from_secs(60), || swarm.ready(0) == NODES);
    meshctl(&swarm, 0, &["node", "ls"]);

    println!("\n== an overlay network and a published service");
    meshctl(&swarm, 0, &["network", "create", "--driver", "overlay", "demo-net"]);
    println!("h0$ meshctl service create --detach --name web --replicas 3 --replicas-max-per-node 1 --network demo-net --publish 8080:80 -- mesh-echo --http 80");
    create_http_service(
        &swarm,
        "web",
        &[
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--network",
            "demo-net",
            "--publish",
            "8080:80",
        ],
    );
    swarm.wait("3 web tasks running", Duration::from_secs(60), || {
        running(&swarm, "web") == NODES
    });
    meshctl(&swarm, 0, &["service", "ps", "web"]);
    let node_of: BTreeMap<String, usize> = placed(&swarm, "web").into_iter().map(|(h, t)| (t, h)).collect();

    println!("\n== the routing mesh: h3 asks each node's 8080 {REQUESTS} times");
    swarm.wait("every node's 8080 answers", Duration::from_secs(30), || {
        (0..NODES).all(|n| {
            let to = SocketAddr::from((host_address(n), 8080));
            swarm.cluster.host(CLIENT).run(move || http_get(to).is_ok())
        })
    });
    let (mut elsewhere, mut failed) = (0, 0);
    for node in 0..NODES {
        for _ in 0..REQUESTS {
            let to = SocketAddr::from((host_address(node), 8080));
            match swarm.cluster.host(CLIENT).run(move || http_get(to)) {
                Ok((task, seen)) => {
                    let on = node_of.get(&task).map_or("?".to_string(), |h| format!("h{h}"));
                    if on != format!("h{node}") {
                        elsewhere += 1;
                    }
                    println!("  h3 -> {to}: answered by task {task} on {on}; the task saw the client as {seen}");
                }
                Err(e) => {
                    failed += 1;
                    println!("  h3 -> {to}: FAILED: {e}");
                }
            }
        }
    }
    println!(
        "  {} requests, {failed} failed, {elsewhere} answered by a task on another node than the one asked",
        NODES * REQUESTS
    );
    println!("\n== what each node's metrics say (http://127.0.0.1:9323/metrics in its namespace)");
    for node in 0..NODES {
        let (_, text) = mesh_tests::mesh::metrics_get(&swarm, node, "/metrics");
        for line in text
            .lines()
            .filter(|l| l.starts_with("mesh_lb_connections_total{") || l.starts_with("mesh_raft_is_leader"))
        {
            println!("  h{node}: {line}");
        }
    }

    if !once {
        println!("\nThe swarm stays up. Try, e.g.:");
        println!(
            "  ip netns exec {} curl -s http://{}:8080/",
            swarm.cluster.host(CLIENT).netns().name(),
            host_address(1)
        );
        println!(
            "  ip netns exec {} {} --socket {} service ls",
            swarm.cluster.host(0).netns().name(),
            mesh_tests::swarm::binary("meshctl").display(),
            swarm.agents[0].socket.display()
        );
        println!("Press Ctrl-C to tear everything down.");
        wait_for(&signals);
    }
    drop(swarm);
    println!("\n== torn down: agents, tasks, namespaces and kernel objects removed");
    anyhow::ensure!(failed == 0, "{failed} requests through the routing mesh failed");
    Ok(())
}

/// Blocks SIGINT and SIGTERM for this thread and every thread it starts.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the mask
    // calls only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits until SIGINT or SIGTERM arrives.
fn wait_for(signals: &libc::sigset_t) {
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set blocked in this thread, as
    // sigwait requires; `signal` is a valid out-pointer.
    unsafe { libc::sigwait(signals, &mut signal) };
}
