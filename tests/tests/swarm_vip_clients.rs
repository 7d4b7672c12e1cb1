//! Kernel lane: service VIPs as ordinary applications use them. Tasks
//! reach a VIP over IPv4 sockets and over IPv6 sockets with the
//! IPv4-mapped address (dual-stack runtimes), by name and by literal
//! address, over TCP and UDP, and see the VIP as their peer; a connection
//! keeps its task while the service changes. A new task, one-off or
//! service, connects at once, with one socket, and gets through: its
//! process starts only once its networks' VIPs are served on its node
//! and the nodes it talks to know its endpoint.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_tests::{
    mesh::placed,
    overlay::{running, service_vip},
    require_root,
    swarm::{binary, Swarm},
};

const CONVERGE: Duration = Duration::from_secs(30);
const PORT: &str = "7000";

/// The hosts running `service`'s tasks.
fn task_hosts(swarm: &Swarm, service: &str) -> BTreeSet<usize> {
    placed(swarm, service).into_iter().map(|(host, _)| host).collect()
}

/// Creates a service of `mesh-echo` arguments on network `app`.
fn echo_service(swarm: &Swarm, name: &str, options: &[&str], args: &[&str]) {
    let echo = binary("mesh-echo");
    let mut argv = vec!["service", "create", "--detach", "--name", name, "--network", "app"];
    argv.extend_from_slice(options);
    argv.push("--");
    argv.push(echo.to_str().unwrap());
    argv.extend_from_slice(args);
    swarm.ok(0, &argv);
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// `meshctl run` on host `host` of a one-off that connects to `api` once,
/// at once (`mesh-echo --first`, `extra` after its arguments): its output
/// and errors, and whether it succeeded.
fn run_first(swarm: &Swarm, host: usize, extra: &[&str]) -> (String, String, bool) {
    let echo = binary("mesh-echo");
    let mut argv = vec![
        "run",
        "--network",
        "app",
        "--",
        echo.to_str().unwrap(),
        "--first",
        "api",
        PORT,
    ];
    argv.extend_from_slice(extra);
    let out = swarm.meshctl(host, &argv);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// One [`run_first`]: (milliseconds from `meshctl run` to the round trip,
/// from the process's start to it), or the one-off's output when it failed.
fn first_connection(swarm: &Swarm, host: usize, extra: &[&str]) -> Result<(u128, u128), String> {
    let asked = unix_ms();
    let (stdout, stderr, _) = run_first(swarm, host, extra);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("first ok "))
        .ok_or_else(|| format!("{stdout}{stderr}"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let in_process: u128 = fields[2].parse().unwrap();
    let done: u128 = fields[3].parse().unwrap();
    Ok((done.saturating_sub(asked), in_process))
}

fn median_and_max(mut v: Vec<u128>) -> (u128, u128) {
    v.sort_unstable();
    (v[v.len() / 2], *v.last().unwrap())
}

#[test]
fn a_new_tasks_first_connection_to_a_vip_on_another_node_completes() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form(3);
    swarm.ok(0, &["network", "create", "--driver", "overlay", "--attachable", "app"]);
    echo_service(&swarm, "api", &["--constraint", "node.hostname==h1"], &[PORT]);
    swarm.wait("api running", CONVERGE, || running(&swarm, "api") == 1);
    assert_eq!(task_hosts(&swarm, "api"), BTreeSet::from([1]));

    // Twenty one-offs in a row on h0, where nothing else runs on `app`:
    // each connects once, at once, with a 2 s timeout.
    let mut from_run = Vec::new();
    let mut from_start = Vec::new();
    let mut failed = Vec::new();
    for i in 0..20 {
        match first_connection(&swarm, 0, &[]) {
            Ok((run, start)) => {
                from_run.push(run);
                from_start.push(start);
            }
            Err(out) => failed.push(format!("one-off {i}: {out}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 20 one-offs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let (run_median, run_max) = median_and_max(from_run);
    let (start_median, start_max) = median_and_max(from_start);
    println!(
        "one-off first round trip: from `meshctl run` median {run_median} ms, max {run_max} ms; \
         from the process's start median {start_median} ms, max {start_max} ms"
    );
    // Dual-stack sockets too.
    first_connection(&swarm, 0, &["inet6"]).expect("a one-off's first IPv6 (v4-mapped) connection");

    // A service task's first connection, on a node new to the network.
    echo_service(
        &swarm,
        "starter",
        &["--constraint", "node.hostname==h2", "--restart-condition", "none"],
        &["--first", "api", PORT],
    );
    let mut logs = String::new();
    swarm.wait("the starter connected or gave up", CONVERGE, || {
        logs = swarm.ok(0, &["service", "logs", "starter"]);
        logs.contains("first ")
    });
    assert!(logs.contains("first ok "), "a service task's first connection: {logs}");

    // A flow whose first SYN is lost completes on the retransmit: nothing
    // on the way keeps the first attempt's failure. h0's overlay bridge
    // drops the first SYN toward the api port (a quota of one SYN).
    let nft = |args: &str| swarm.cluster.host(0).tool("nft", args);
    nft("add table bridge lose-first-syn");
    nft("add chain bridge lose-first-syn forward { type filter hook forward priority 0 ; }");
    nft(&format!(
        "add rule bridge lose-first-syn forward tcp dport {PORT} tcp flags & (syn|ack) == syn quota until 61 bytes counter drop"
    ));
    let started = Instant::now();
    let lost_first = first_connection(&swarm, 0, &[]);
    let rules = nft("list table bridge lose-first-syn");
    nft("delete table bridge lose-first-syn");
    assert!(
        rules.contains("counter packets 1 "),
        "exactly one SYN was dropped: {rules}"
    );
    let (run, _) = lost_first.expect("a connection whose first SYN was lost");
    println!(
        "first SYN lost: connected {run} ms after `meshctl run` ({} ms in all)",
        started.elapsed().as_millis()
    );
}

/// The `tcp` and `udp` lines of the `mesh-echo --connect` run that
/// follows the line `marker` in `logs` (`service logs` output: each line
/// after its task's `NAME@NODE | ` prefix).
fn client_run<'a>(logs: &'a str, marker: &str) -> Vec<&'a str> {
    logs.lines()
        .map(|l| l.split_once("| ").map_or(l, |(_, text)| text))
        .skip_while(|l| !l.contains(marker))
        .skip(1)
        .take_while(|l| !l.starts_with("run "))
        .filter(|l| l.starts_with("tcp ") || l.starts_with("udp "))
        .collect()
}

#[test]
fn a_vip_answers_ipv4_and_dual_stack_sockets_by_name_and_by_address() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form(3);
    swarm.ok(0, &["network", "create", "--driver", "overlay", "app"]);
    echo_service(&swarm, "api", &["--replicas", "2"], &[PORT]);
    swarm.wait("api running", CONVERGE, || running(&swarm, "api") == 2);
    let api = service_vip(&swarm, "api");

    // One client task runs every combination in turn: IPv4 and IPv6
    // (v4-mapped) sockets, to the name and to the VIP's literal address;
    // each run opens 10 TCP connections and sends 10 UDP datagrams.
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    let runs = [
        ("ipv4-name", "api", ""),
        ("ipv6-name", "api", "inet6"),
        ("ipv4-literal", &api.to_string() as &str, ""),
        ("ipv6-literal", &api.to_string(), "inet6"),
    ]
    .map(|(label, to, family)| format!("echo run {label}; {echo} --connect {to} {PORT} 10 {family}"));
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "clients",
            "--network",
            "app",
            "--restart-condition",
            "none",
            "--",
            "sh",
            "-c",
            &format!("{}; echo run done", runs.join("; ")),
        ],
    );
    let mut logs = String::new();
    swarm.wait("the clients finished", CONVERGE, || {
        logs = swarm.ok(0, &["service", "logs", "clients"]);
        logs.contains("run done")
    });
    let mapped = format!("[::ffff:{api}]:{PORT}");
    let plain = format!("{api}:{PORT}");
    for (label, peer) in [
        ("ipv4-name", &plain),
        ("ipv6-name", &mapped),
        ("ipv4-literal", &plain),
        ("ipv6-literal", &mapped),
    ] {
        let lines = client_run(&logs, &format!("run {label}"));
        let tcp: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("tcp ")).collect();
        let udp: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("udp ")).collect();
        assert_eq!((tcp.len(), udp.len()), (10, 10), "{label}: {logs}");
        let mut served = BTreeSet::new();
        for line in &tcp {
            let (seen, task) = line.split_once(' ').unwrap_or((line, ""));
            assert_eq!(seen, peer, "{label}: getpeername shows the VIP as asked for: {logs}");
            assert!(!task.is_empty(), "{label}: a task answered: {logs}");
            served.insert(task.to_string());
        }
        assert!(
            served.len() == 2,
            "{label}: connections spread over both tasks: {served:?}"
        );
        for line in &udp {
            assert!(
                line.starts_with(&format!("{peer} ")) && line.ends_with(" datagram"),
                "{label}: UDP answers come from the VIP as asked for: {logs}"
            );
        }
        println!("{label}: 10 of 10 TCP and UDP through the VIP, tasks {served:?}");
    }

    // A connection keeps its task for its life, in both families, while
    // the service's tasks change around it.
    echo_service(
        &swarm,
        "stay4",
        &["--restart-condition", "none"],
        &["--stay", "api", PORT, "6"],
    );
    echo_service(
        &swarm,
        "stay6",
        &["--restart-condition", "none"],
        &["--stay", "api", PORT, "6", "inet6"],
    );
    swarm.wait("both long connections open", CONVERGE, || {
        ["stay4", "stay6"]
            .iter()
            .all(|s| swarm.ok(0, &["service", "logs", s]).contains("stay connected"))
    });
    swarm.ok(0, &["service", "scale", "api=4"]);
    swarm.wait("4 api tasks", CONVERGE, || running(&swarm, "api") == 4);
    for (service, peer) in [("stay4", &plain), ("stay6", &mapped)] {
        let mut logs = String::new();
        swarm.wait(&format!("{service} finished"), CONVERGE, || {
            logs = swarm.ok(0, &["service", "logs", service]);
            logs.contains("stay ") && (logs.contains(" ok ") || logs.contains("stay error"))
        });
        let done = logs
            .lines()
            .filter_map(|l| l.split_once("| ").map(|(_, text)| text))
            .find(|l| l.starts_with("stay ") && l.contains(" ok "))
            .unwrap_or_else(|| panic!("{service}: the connection broke: {logs}"));
        let fields: Vec<&str> = done.split_whitespace().collect();
        assert_eq!(fields[1], peer.as_str(), "{service}: {logs}");
        let lines: usize = fields[4].parse().unwrap();
        assert!(lines >= 30, "{service}: echoed {lines} lines in 6 s: {logs}");
    }
}

#[test]
fn a_task_waits_a_bounded_time_for_a_silent_peer_to_learn_its_endpoint_and_says_so() {
    require_root();
    let swarm = Swarm::new(3);
    // Nodes are Down after 3 missed 5 s heartbeats: a silent node stays a
    // peer for longer than a task waits for it.
    let addr = swarm.cluster.host(0).address().to_string();
    swarm.ok(
        0,
        &[
            "swarm",
            "init",
            "--advertise-addr",
            &addr,
            "--dispatcher-heartbeat",
            "5s",
        ],
    );
    for i in 1..3 {
        swarm.join(i, 0, "worker");
    }
    swarm.wait("3 nodes ready", CONVERGE, || swarm.ready(0) == 3);
    swarm.ok(0, &["network", "create", "--driver", "overlay", "--attachable", "app"]);
    echo_service(&swarm, "api", &["--constraint", "node.hostname==h1"], &[PORT]);
    echo_service(&swarm, "idle", &["--constraint", "node.hostname==h2"], &["7001"]);
    swarm.wait("api and idle running", CONVERGE, || {
        running(&swarm, "api") == 1 && running(&swarm, "idle") == 1
    });
    // With every node answering, a one-off waits for nobody.
    let (run, _) = first_connection(&swarm, 0, &[]).expect("a one-off with every peer answering");
    assert!(run < 5000, "a one-off waited {run} ms with every peer answering");

    // h2's agent stops answering (its task runs on): a one-off on h0
    // waits for it, then starts anyway and says so.
    let h2 = swarm.pid(2).expect("h2's agent runs");
    // SAFETY: a plain signal to a process this test started.
    assert_eq!(unsafe { libc::kill(h2 as i32, libc::SIGSTOP) }, 0);
    let asked = Instant::now();
    let (stdout, stderr, succeeded) = run_first(&swarm, 0, &[]);
    let waited = asked.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(h2 as i32, libc::SIGCONT) }, 0);
    assert!(succeeded, "{stdout}{stderr}");
    assert!(stdout.contains("first ok "), "the one-off reached api on h1: {stdout}");
    assert!(
        stderr.contains("node(s) on its networks to learn its endpoint")
            && stderr.contains("started after 5s before every node on its networks had learnt its endpoint"),
        "`meshctl run` says what it waited for: {stderr}"
    );
    assert!(
        waited >= Duration::from_secs(5),
        "the process started only once the wait was over: {waited:?}"
    );
    println!("with a silent peer, the one-off started after {waited:?}: {stderr}");
}
