//! Kernel lane: services over a real swarm: tasks are placed,
//! started in their own namespaces on their nodes, supervised, and removed
//! without a trace.

use std::{collections::BTreeMap, fs, time::Duration};

use mesh_tests::{require_root, swarm::Swarm};

use mesh_tests::process::processes_with;

const CONVERGE: Duration = Duration::from_secs(30);

/// A `sleep` whose argument is unique to this test run, so the test can
/// find its processes (and prove they are gone) among everything else.
fn marked_sleep() -> String {
    format!("100000.{}{:03}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The tasks of `service` that should run (desired Running), as
/// `service ps --format json` lists them.
fn wanted_tasks(swarm: &Swarm, service: &str) -> Vec<serde_json::Value> {
    let out = swarm.meshctl(0, &["service", "ps", "--format", "json", service]);
    let tasks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    tasks
        .into_iter()
        .filter(|t| t["task"]["desired"] == "Running")
        .collect()
}

/// Tasks of `service` in `state`.
fn tasks_in(swarm: &Swarm, service: &str, state: &str) -> usize {
    wanted_tasks(swarm, service)
        .iter()
        .filter(|t| t["task"]["state"] == state)
        .count()
}

/// Live (desired Running) tasks per node hostname.
fn placement(swarm: &Swarm, service: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in wanted_tasks(swarm, service) {
        let node = t["node_hostname"].as_str().unwrap_or("-").to_string();
        *m.entry(node).or_default() += 1;
    }
    m
}

#[test]
fn services_spread_scale_follow_drains_and_go_away() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form_with_workers();

    let marker = marked_sleep();
    let id = swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "6",
            "--",
            "sleep",
            &marker,
        ],
    );
    assert_eq!(id.trim().len(), 13, "prints the service ID: {id}");
    let even: BTreeMap<String, usize> = [("h0".into(), 2), ("h1".into(), 2), ("h2".into(), 2)].into();
    swarm.wait("6 tasks spread 2/2/2", CONVERGE, || placement(&swarm, "web") == even);
    swarm.wait("6 tasks running", CONVERGE, || tasks_in(&swarm, "web", "Running") == 6);
    assert_eq!(processes_with(&marker).len(), 6, "one process per task");
    let ls = swarm.ok(0, &["service", "ls"]);
    assert!(
        ls.contains("web") && ls.contains("replicated") && ls.contains("6/6") && ls.contains("sleep"),
        "{ls}"
    );
    let ps = swarm.ok(0, &["service", "ps", "web"]);
    assert!(ps.contains("web.1") && ps.contains("Running"), "{ps}");

    // A task whose process is killed is restarted (default policy: any,
    // after 5 s) and its failure shows in `service ps`.
    let victim = processes_with(&marker)[0];
    // SAFETY: kill has no memory preconditions; the PID is a task's.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    swarm.wait("the kill recorded", CONVERGE, || {
        swarm.ok(0, &["service", "ps", "web"]).contains("killed by signal 9")
    });
    swarm.wait("the killed task replaced", CONVERGE, || {
        tasks_in(&swarm, "web", "Running") == 6 && processes_with(&marker).len() == 6
    });

    swarm.ok(0, &["service", "scale", "web=1"]);
    swarm.wait("one task left", CONVERGE, || {
        placement(&swarm, "web").values().sum::<usize>() == 1
    });
    swarm.ok(0, &["service", "scale", "web=6"]);
    swarm.wait("back to 2/2/2", CONVERGE, || placement(&swarm, "web") == even);

    swarm.ok(0, &["node", "update", "--availability", "drain", "h1"]);
    swarm.wait("h1 drained, 3/3 on the others", CONVERGE, || {
        placement(&swarm, "web") == [("h0".into(), 3), ("h2".into(), 3)].into()
    });

    let global = swarm.ok(
        0,
        &[
            "service", "create", "--name", "agent", "--mode", "global", "--", "sleep", &marker,
        ],
    );
    assert!(!global.trim().is_empty());
    swarm.wait("a global task on every active node", CONVERGE, || {
        placement(&swarm, "agent") == [("h0".into(), 1), ("h2".into(), 1)].into()
    });

    swarm.ok(0, &["service", "rm", "web", "agent"]);
    assert!(swarm.ok(0, &["service", "ls", "-q"]).trim().is_empty());
    swarm.wait("every task process gone", CONVERGE, || {
        processes_with(&marker).is_empty()
    });
    swarm.wait("no task namespace, veth or address left", CONVERGE, || {
        (0..3).all(|i| leftovers(&swarm, i).is_empty())
    });
}

/// What tasks left on host `i`: task directories (with their namespace
/// mounts) and host-side veths.
fn leftovers(swarm: &Swarm, i: usize) -> Vec<String> {
    let mut left: Vec<String> = fs::read_dir(swarm.agents[i].data_dir.join("tasks"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| format!("task dir {}", e.file_name().to_string_lossy()))
        .collect();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-o", "link", "show"]);
    let links = swarm
        .cluster
        .host(i)
        .output(cmd, Duration::from_secs(10))
        .expect("ip link");
    left.extend(
        String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter(|l| l.contains(": mv"))
            .map(|l| format!("veth {l}")),
    );
    left
}

#[test]
fn bad_service_input_is_refused_and_changes_nothing() {
    require_root();
    let swarm = Swarm::new(1);
    swarm.init(&[]);
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            "8080:80",
            "--",
            "sleep",
            "1000",
        ],
    );
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--name", "a", "--network", "nosuch", "--", "true"],
            3,
            "network nosuch not found",
        ),
        (
            &["--name", "b", "--publish", "8080", "--", "true"],
            2,
            "PUBLISHED:TARGET",
        ),
        (
            &["--name", "c", "--publish", "8080:81", "--", "true"],
            4,
            "already published by service web",
        ),
        (
            &["--name", "d", "--constraint", "node.label.zone==a", "--", "true"],
            2,
            "invalid constraint key",
        ),
        (
            &["--name", "p1", "--publish", "70000:80", "--", "true"],
            2,
            "not a port number (1-65535)",
        ),
        (
            &["--name", "p2", "--publish", "8081:80/sctp", "--", "true"],
            2,
            "protocol is tcp or udp",
        ),
        (
            &["--name", "p3", "--publish", "4789:80/udp", "--", "true"],
            2,
            "is the swarm's own (overlay VXLAN)",
        ),
        (
            &["--name", "p4", "--publish", "2377:80", "--", "true"],
            2,
            "is the swarm's own (a node's cluster port)",
        ),
        (
            &[
                "--name",
                "p5",
                "--lb-affinity",
                "client-ip",
                "--lb-affinity-timeout",
                "48h",
                "--",
                "true",
            ],
            2,
            "out of range",
        ),
        (
            &["--name", "p6", "--lb-algorithm", "weighted", "--", "true"],
            2,
            "invalid value",
        ),
        (&["--name", "web", "--", "true"], 4, "already exists"),
        (&["--name", "bad name", "--", "true"], 2, "invalid service name"),
        (&["--name", "e", "--replicas", "-1", "--", "true"], 2, ""),
        (
            &[
                "--name",
                "f",
                "--endpoint-mode",
                "dnsrr",
                "--publish",
                "9090:80",
                "--",
                "true",
            ],
            2,
            "--endpoint-mode vip",
        ),
    ];
    for (args, code, text) in cases {
        let mut full = vec!["service", "create"];
        full.extend_from_slice(args);
        let (got, err) = swarm.fails(0, &full);
        assert_eq!(got, *code, "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
    }
    assert_eq!(
        swarm.ok(0, &["service", "ls", "-q"]).lines().count(),
        1,
        "nothing half-created"
    );
    assert_eq!(swarm.fails(0, &["service", "ps", "nosuch"]).0, 3);
    assert_eq!(swarm.fails(0, &["service", "scale", "web"]).0, 2);
    let (code, err) = swarm.fails(0, &["swarm", "update", "--task-history-limit", "1000"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at most 100"), "{err}");

    // Restart policy and endpoint mode are the managers' business: changing
    // them replaces no task. The pretty inspect shows what changed.
    let before = versions(&swarm, "web");
    swarm.ok(
        0,
        &[
            "service",
            "update",
            "--restart-condition",
            "on-failure",
            "--restart-max-attempts",
            "3",
            "--publish-rm",
            "8080",
            "--endpoint-mode",
            "dnsrr",
            "web",
        ],
    );
    assert_eq!(versions(&swarm, "web"), before, "no task was replaced");
    let pretty = swarm.ok(0, &["service", "inspect", "--pretty", "web"]);
    for want in [
        "Name:",
        "web",
        "on-failure",
        "Max attempts:",
        "3",
        "Endpoint Mode:",
        "dnsrr",
        "sleep 1000",
    ] {
        assert!(pretty.contains(want), "missing {want:?}:\n{pretty}");
    }

    // History shrinks to the cluster's limit at once and stays there.
    swarm.ok(0, &["swarm", "update", "--task-history-limit", "1"]);
    for _ in 0..2 {
        swarm.ok(0, &["service", "update", "--force", "web"]);
    }
    swarm.wait("one running task and one ended one", CONVERGE, || {
        swarm.ok(0, &["service", "ps", "-q", "web"]).lines().count() == 2
    });
}

#[test]
fn tasks_log_fail_clearly_get_replaced_when_unhealthy_and_move_off_lost_nodes() {
    require_root();
    let mut swarm = Swarm::new(3);
    swarm.form_with_workers();
    let marker = marked_sleep();

    // Logs: each task's output, labelled with its task and node; the task
    // has its own hostname (UTS namespace) and only its own links.
    let script = format!(
        "echo hello from $MESH_TASK_NAME on $(hostname); ls /sys/class/net | tr '\\n' ' '; echo; exec sleep {marker}"
    );
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "talk",
            "--replicas",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    swarm.wait("2 talkers running", CONVERGE, || {
        tasks_in(&swarm, "talk", "Running") == 2
    });
    swarm.wait("their logs", CONVERGE, || {
        let logs = swarm.ok(0, &["service", "logs", "talk"]);
        logs.contains("| hello from talk.1 on ") && logs.contains("| hello from talk.2 on ")
    });
    let logs = swarm.ok(0, &["service", "logs", "--tail", "1", "talk"]);
    assert_eq!(logs.lines().count(), 2, "one line per task: {logs}");
    for line in logs.lines() {
        assert!(line.starts_with("talk."), "labelled NAME.SLOT.ID@NODE: {line}");
        let links = line.split("| ").nth(1).unwrap_or_default();
        // (ifb0/ifb1 appear in every new namespace where the ifb module is loaded.)
        let mut links: Vec<&str> = links.split_whitespace().filter(|l| !l.starts_with("ifb")).collect();
        links.sort();
        assert_eq!(links, ["eth0", "lo"], "a task sees only its own links: {line}");
    }

    // A command that does not exist: the task is rejected with a clear
    // error, the rest of the cluster carries on.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "broken",
            "--restart-max-attempts",
            "1",
            "--restart-delay",
            "1s",
            "--",
            "/nonexistent/mesh-binary",
        ],
    );
    swarm.wait("the missing command reported", CONVERGE, || {
        let ps = swarm.ok(0, &["service", "ps", "broken"]);
        ps.matches("Rejected").count() == 2 && ps.contains("executable file not found")
    });
    assert_eq!(tasks_in(&swarm, "talk", "Running"), 2, "other services are untouched");

    // A task that never gets healthy is failed and (restart-condition none)
    // not restarted.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "sick",
            "--restart-condition",
            "none",
            "--health-cmd",
            "echo probing; exit 3",
            "--health-interval",
            "200ms",
            "--health-retries",
            "2",
            "--",
            "sleep",
            &marker,
        ],
    );
    swarm.wait("the unhealthy task failed", CONVERGE, || {
        let ps = swarm.ok(0, &["service", "ps", "sick"]);
        ps.contains("Failed") && ps.contains("unhealthy") && ps.contains("probing")
    });

    // A node whose agent dies loses its tasks to the others after the
    // grace period.
    swarm.ok(0, &["service", "rm", "sick", "broken"]);
    swarm.ok(0, &["service", "scale", "talk=3"]);
    swarm.wait("talk on all 3 nodes", CONVERGE, || placement(&swarm, "talk").len() == 3);
    swarm.kill(2);
    swarm.wait("h2's task moved to h0 and h1", Duration::from_secs(60), || {
        let p = placement(&swarm, "talk");
        !p.contains_key("h2") && p.values().sum::<usize>() == 3
    });
    swarm.wait("3 talkers running", CONVERGE, || {
        tasks_in(&swarm, "talk", "Running") == 3
    });
}

/// `(service_version, state)` of a service's live tasks.
fn versions(swarm: &Swarm, service: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = wanted_tasks(swarm, service)
        .iter()
        .map(|t| {
            (
                t["task"]["service_version"].as_u64().unwrap_or(0),
                t["task"]["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn update_state(swarm: &Swarm, service: &str) -> String {
    let out = swarm.ok(0, &["service", "inspect", service]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["service"]["update_status"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn rolling_updates_pause_or_roll_back_when_new_tasks_are_unhealthy() {
    require_root();
    let swarm = Swarm::new(2);
    swarm.form_with_workers();
    let marker = marked_sleep();
    // Healthy while VERSION=good; the update breaks it.
    let out = swarm.ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--env",
            "VERSION=good",
            "--health-cmd",
            "test \"$VERSION\" = good",
            "--health-interval",
            "200ms",
            "--health-retries",
            "2",
            "--restart-delay",
            "1s",
            "--",
            "sleep",
            &marker,
        ],
    );
    assert!(
        out.contains("verify: service converged"),
        "create waits for its tasks: {out}"
    );
    let v1: Vec<(u64, String)> = vec![(1, "Running".into()); 3];
    assert_eq!(versions(&swarm, "web"), v1);

    // Without --detach, the update shows progress and fails once it pauses;
    // the tasks not yet replaced keep running the old version.
    let (code, err) = swarm.fails(0, &["service", "update", "web", "--env-add", "VERSION=bad"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("update paused") && err.contains("unhealthy"), "{err}");
    assert_eq!(update_state(&swarm, "web"), "Paused");
    let old_running = versions(&swarm, "web")
        .iter()
        .filter(|(v, s)| *v == 1 && s == "Running")
        .count();
    assert_eq!(old_running, 2, "parallelism 1: one task replaced, two still serve");

    let out = swarm.ok(0, &["service", "rollback", "web"]);
    assert!(out.contains("converged"), "{out}");
    assert_eq!(update_state(&swarm, "web"), "RolledBack");
    assert!(versions(&swarm, "web").iter().all(|(v, s)| *v == 3 && s == "Running"));

    // With --update-failure-action rollback the swarm goes back by itself.
    swarm.ok(
        0,
        &[
            "service",
            "update",
            "--detach",
            "--update-failure-action",
            "rollback",
            "--update-parallelism",
            "2",
            "--env-add",
            "VERSION=worse",
            "web",
        ],
    );
    swarm.wait("rolled back by itself", CONVERGE, || {
        update_state(&swarm, "web") == "RolledBack"
            && versions(&swarm, "web").iter().filter(|(_, s)| s == "Running").count() == 3
    });
    let inspect = swarm.ok(0, &["service", "inspect", "web"]);
    assert!(
        inspect.contains("\"VERSION\": \"good\""),
        "the good spec is back: {inspect}"
    );
    swarm.ok(0, &["service", "rm", "web"]);
    swarm.wait("every task process gone", CONVERGE, || {
        processes_with(&marker).is_empty()
    });
}

#[test]
fn tasks_reach_beyond_their_node_masqueraded_and_leaving_removes_the_nat() {
    use mesh_agent::dataplane::nftables;
    use std::{
        io::Read,
        net::{SocketAddr, TcpListener},
        time::Instant,
    };
    require_root();
    let swarm = Swarm::new(2);
    swarm.init(&[]);
    let (h0, h1) = (swarm.cluster.host(0), swarm.cluster.host(1));
    // A listener on h1, which is not in the swarm and has no route to the
    // node-local pool: only a masqueraded connection can be answered.
    let listener = h1.run(|| TcpListener::bind((h1.address(), 7000)).expect("listen on h1"));
    listener.set_nonblocking(true).unwrap();
    let marker = marked_sleep();
    let script = format!(
        "echo hello-from-task | busybox nc {} 7000; sleep {marker}",
        h1.address()
    );
    swarm.ok(
        0,
        &[
            "service", "create", "--detach", "--name", "out", "--", "sh", "-c", &script,
        ],
    );
    let deadline = Instant::now() + CONVERGE;
    let (mut stream, peer): (_, SocketAddr) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                swarm.dump_logs();
                panic!("the task never connected to h1: {e}");
            }
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    assert_eq!(got.trim(), "hello-from-task");
    assert_eq!(
        peer.ip(),
        h0.address(),
        "the task's address is masqueraded to its node's"
    );
    assert!(h0.run(nftables::table_exists).unwrap(), "h0 holds the NAT table");

    swarm.ok(0, &["swarm", "leave", "--force"]);
    assert!(processes_with(&marker).is_empty(), "leaving stops the tasks");
    assert!(
        !h0.run(nftables::table_exists).unwrap(),
        "leaving removes the NAT table"
    );
    let bridge = h0.run(|| std::fs::metadata("/sys/class/net/mesh_gwbridge").is_ok());
    assert!(!bridge, "leaving removes the node bridge");
}

#[test]
fn a_global_service_follows_a_node_that_joins_later() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);
    let marker = marked_sleep();
    swarm.ok(
        0,
        &[
            "service", "create", "--mode", "global", "--name", "agent", "--", "sleep", &marker,
        ],
    );
    assert_eq!(placement(&swarm, "agent").len(), 2);
    swarm.join(2, 0, "worker");
    swarm.wait("a task on the new node", CONVERGE, || {
        placement(&swarm, "agent").get("h2") == Some(&1) && tasks_in(&swarm, "agent", "Running") == 3
    });
    assert_eq!(processes_with(&marker).len(), 3);
}
