//! Kernel lane: the task sandbox, tried as an attacker inside a task would.
//! A task running as root (the default) cannot read the node's KEK or Raft
//! store, reach the agent's socket, read another task's secret, see other
//! processes, enter the node's network namespace, make a user namespace,
//! mount, use the kernel keyring or open a disk through a node it makes;
//! its effective capabilities are Docker's default set. `--cap-add
//! SYS_ADMIN --security-opt seccomp=unconfined` gives the calls back,
//! `--read-only` makes the node's file system read-only, `--user` drops
//! every capability, and bad flags are refused with the reason.

use std::time::Duration;

use mesh_tests::{
    overlay::running,
    require_root,
    swarm::{binary, Swarm},
};

const CONVERGE: Duration = Duration::from_secs(30);

/// Creates service `name` running the probe with `probes`, waits for its
/// report and returns it.
fn probe(swarm: &Swarm, name: &str, flags: &[&str], probes: &[&str]) -> String {
    let probe = binary("mesh-probe");
    let mut args = vec!["service", "create", "--detach", "--name", name];
    args.extend_from_slice(flags);
    args.push("--");
    args.push(probe.to_str().unwrap());
    args.extend_from_slice(probes);
    swarm.ok(0, &args);
    let mut logs = String::new();
    swarm.wait(&format!("{name}'s probes"), CONVERGE, || {
        logs = swarm.ok(0, &["service", "logs", name]);
        logs.contains("probe done")
    });
    logs
}

/// The result of probe line `what` in `logs`.
fn outcome<'a>(logs: &'a str, what: &str) -> &'a str {
    logs.lines()
        .find_map(|l| l.split_once(&format!("{what}: ")).map(|(_, r)| r.trim()))
        .unwrap_or_else(|| panic!("no {what:?} in the probe's report:\n{logs}"))
}

#[test]
fn a_task_cannot_reach_the_node_or_other_tasks() {
    require_root();
    let swarm = Swarm::new(1);
    swarm.init(&[]);
    let data = swarm.agents[0].data_dir.clone();
    let socket = swarm.agents[0].socket.clone();
    let kek = data.join("keys/kek");
    let raft = data.join("raft/raft.redb");
    assert!(
        kek.exists() && raft.exists(),
        "the node has a KEK and a Raft store to protect"
    );

    // A task holding a secret, whose process the attacker knows.
    swarm.meshctl_stdin(0, &["secret", "create", "db_password", "-"], "sandbox-secret-4711");
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "holder",
            "--secret",
            "db_password",
            "--",
            "sleep",
            "600",
        ],
    );
    swarm.wait("the secret's holder runs", CONVERGE, || running(&swarm, "holder") == 1);
    let holder_pid = live_task_pid(&swarm);
    let other_secret = format!("/proc/{holder_pid}/root/run/secrets/db_password");
    let seen = std::fs::read_to_string(&other_secret);
    assert!(
        seen.as_ref().is_ok_and(|s| s == "sandbox-secret-4711"),
        "the node sees the holder's secret where the attacker will look ({other_secret}): {seen:?}"
    );

    let host_netns = format!("/run/netns/{}", swarm.cluster.host(0).netns().name());
    let logs = probe(
        &swarm,
        "attacker",
        &[],
        &[
            "uid",
            "caps",
            "pids",
            "read",
            kek.to_str().unwrap(),
            "read",
            raft.to_str().unwrap(),
            "read",
            &other_secret,
            "connect",
            socket.to_str().unwrap(),
            "setns",
            &host_netns,
            "unshare-user",
            "mount",
            "keyctl",
            "mknod-disk",
            "write",
            "/sys/kernel/mm/transparent_hugepage/enabled",
        ],
    );
    assert_eq!(outcome(&logs, "uid"), "0", "{logs}");
    assert_eq!(
        outcome(&logs, "caps"),
        "00000000a80425fb",
        "Docker's default set: {logs}"
    );
    // PID 1 (the namespace's init) and the probe: nothing of the node.
    assert_eq!(outcome(&logs, "pids"), "[1, 2]", "{logs}");
    assert_ne!(outcome(&logs, &format!("read {}", kek.display())), "ok", "{logs}");
    assert_ne!(outcome(&logs, &format!("read {}", raft.display())), "ok", "{logs}");
    assert_ne!(outcome(&logs, &format!("read {other_secret}")), "ok", "{logs}");
    assert_ne!(outcome(&logs, &format!("connect {}", socket.display())), "ok", "{logs}");
    assert_eq!(outcome(&logs, &format!("setns {host_netns}")), "EPERM", "{logs}");
    assert_eq!(outcome(&logs, "unshare-user"), "EPERM", "{logs}");
    assert_eq!(outcome(&logs, "mount"), "EPERM", "{logs}");
    assert_eq!(outcome(&logs, "keyctl"), "EPERM", "{logs}");
    assert_ne!(outcome(&logs, "mknod-disk"), "ok", "{logs}");
    assert_eq!(
        outcome(&logs, "write /sys/kernel/mm/transparent_hugepage/enabled"),
        "EROFS",
        "{logs}"
    );

    // Capabilities and the filter given back, as the operator asked.
    let logs = probe(
        &swarm,
        "admin",
        &["--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined"],
        // The mount first: a process in a user namespace of its own has no
        // capability over the task's mount namespace.
        &["caps", "mount", "keyctl", "unshare-user"],
    );
    assert_eq!(outcome(&logs, "caps"), "00000000a82425fb", "SYS_ADMIN added: {logs}");
    assert_eq!(outcome(&logs, "unshare-user"), "ok", "{logs}");
    assert_eq!(outcome(&logs, "mount"), "ok", "{logs}");
    assert_eq!(outcome(&logs, "keyctl"), "ok", "{logs}");
    let inspect = swarm.ok(0, &["service", "inspect", "--pretty", "admin"]);
    assert!(
        inspect.contains("SYS_ADMIN") && inspect.contains("seccomp=unconfined"),
        "{inspect}"
    );

    // --read-only and --user.
    let logs = probe(
        &swarm,
        "readonly",
        &["--read-only"],
        &["write", "/tmp/mesh-probe-file", "write", "/dev/shm/x"],
    );
    assert_eq!(outcome(&logs, "write /tmp/mesh-probe-file"), "EROFS", "{logs}");
    assert_eq!(
        outcome(&logs, "write /dev/shm/x"),
        "ok",
        "/dev/shm stays writable: {logs}"
    );
    let logs = probe(&swarm, "nobody", &["--user", "65534"], &["uid", "caps"]);
    assert_eq!(outcome(&logs, "uid"), "65534", "{logs}");
    assert_eq!(outcome(&logs, "caps"), "0000000000000000", "{logs}");

    // Bad flags: refused with the reason, nothing created.
    for (flags, reason) in [
        (&["--cap-add", "NET_ADMINS"][..], "unknown capability \"NET_ADMINS\""),
        (
            &["--security-opt", "apparmor=unconfined"][..],
            "unsupported --security-opt",
        ),
        (&["--cap-add", "NET_ADMIN", "--cap-drop", "NET_ADMIN"][..], "contradict"),
    ] {
        let mut args = vec!["service", "create", "--detach", "--name", "bad"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "sleep", "600"]);
        let (_, err) = swarm.fails(0, &args);
        assert!(err.contains(reason), "{flags:?}: {err}");
    }
    assert!(!swarm.ok(0, &["service", "ls"]).contains("bad"));
}

/// The PID (the task's first process, as its node records it) of the one
/// live task on host 0.
fn live_task_pid(swarm: &Swarm) -> u32 {
    std::fs::read_dir(swarm.agents[0].data_dir.join("tasks"))
        .expect("the node's task directory")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .filter_map(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .find(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("a live task")
}

/// `file` of the live task's cgroup of `controller` (v1) or of its v2 one.
fn task_cgroup_file(swarm: &Swarm, controller: &str, file: &str) -> Option<String> {
    let pid = live_task_pid(swarm);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        let base = if names.split(',').any(|n| n == controller) {
            format!("/sys/fs/cgroup/{controller}{path}")
        } else if names.is_empty() {
            let root = if std::path::Path::new("/sys/fs/cgroup/unified").exists() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            format!("{root}{path}")
        } else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(format!("{base}/{file}")) {
            return Some(text.trim().to_string());
        }
    }
    None
}

#[test]
fn limits_hold_a_task_and_an_oom_kill_is_reported_and_restarted() {
    require_root();
    let swarm = Swarm::new(1);
    swarm.init(&[]);

    // Over its memory limit: OOM killed, said so, restarted (the default
    // policy), and the node and its agent carry on.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "hog",
            "--limit-memory",
            "32M",
            "--restart-delay",
            "1s",
            "--",
            binary("mesh-probe").to_str().unwrap(),
            "alloc",
            "200",
        ],
    );
    let mut ps = String::new();
    swarm.wait("the hog OOM killed and restarted", CONVERGE, || {
        ps = swarm.ok(0, &["service", "ps", "hog"]);
        ps.matches("OOM killed").count() >= 2
    });
    assert!(ps.contains("32MiB"), "the limit is named: {ps}");
    let inspect = swarm.ok(0, &["service", "inspect", "--pretty", "hog"]);
    assert!(inspect.contains("Memory") && inspect.contains("32MiB"), "{inspect}");
    swarm.ok(0, &["service", "rm", "hog"]);

    // A fork loop stops at the pids limit (the task's init processes count).
    let logs = probe(
        &swarm,
        "forker",
        &["--limit-pids", "20", "--limit-cpu", "0.5"],
        &["fork", "100"],
    );
    let made: usize = outcome(&logs, "fork 100")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(made < 20, "at most 20 processes in the task: {logs}");
    assert!(outcome(&logs, "fork 100").contains("EAGAIN"), "{logs}");
    let quota = task_cgroup_file(&swarm, "cpu", "cpu.cfs_quota_us")
        .or_else(|| task_cgroup_file(&swarm, "cpu", "cpu.max"))
        .expect("the task's cpu cgroup");
    assert!(quota.starts_with("50000"), "0.5 CPU is 50 ms per 100 ms: {quota}");
    // An update removes a limit with 0 and keeps the others.
    swarm.ok(0, &["service", "update", "--detach", "--limit-cpu", "0", "forker"]);
    let inspect = swarm.ok(0, &["service", "inspect", "--pretty", "forker"]);
    assert!(inspect.contains("Pids") && !inspect.contains("CPU:"), "{inspect}");

    // Bad limits are refused with the reason.
    for (flags, reason) in [
        (&["--limit-memory", "4M"][..], "minimum is 6MiB"),
        (&["--limit-memory", "lots"][..], "expected a size"),
        (&["--limit-cpu=-1"][..], "give a number of CPUs above 0"),
        (
            &["--limit-memory", "64M", "--reserve-memory", "1G"][..],
            "more than --limit-memory",
        ),
    ] {
        let mut args = vec!["service", "create", "--detach", "--name", "bad"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "sleep", "600"]);
        let (_, err) = swarm.fails(0, &args);
        assert!(err.contains(reason), "{flags:?}: {err}");
    }
}

#[test]
fn a_reservation_larger_than_what_is_left_waits_with_the_reason() {
    require_root();
    let swarm = Swarm::new(1);
    swarm.init(&[]);
    // The node reports its memory; each service keeps 60% of it.
    let mut inspect = String::new();
    swarm.wait("the node's resources reported", CONVERGE, || {
        inspect = swarm.ok(0, &["node", "inspect", "--pretty", "self"]);
        !inspect.contains("Memory:\t\t0B")
    });
    let kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap();
    let share = format!("{}k", kib * 6 / 10);
    for name in ["first", "second"] {
        swarm.ok(
            0,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                name,
                "--reserve-memory",
                &share,
                "--",
                "sleep",
                "600",
            ],
        );
    }
    // Whichever is placed first keeps the memory; the other waits, saying why.
    let mut state = (0, 0);
    let until = std::time::Instant::now() + CONVERGE;
    while std::time::Instant::now() < until {
        state = (running(&swarm, "first"), running(&swarm, "second"));
        if state.0 + state.1 == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(state.0 + state.1, 1, "one of the two runs: {inspect}");
    let (placed, waiting) = if state.0 == 1 {
        ("first", "second")
    } else {
        ("second", "first")
    };
    let mut ps = String::new();
    let until = std::time::Instant::now() + CONVERGE;
    while std::time::Instant::now() < until {
        ps = swarm.ok(0, &["service", "ps", waiting]);
        if ps.contains("insufficient memory on 1 node") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ps.contains("insufficient memory on 1 node"), "{ps}");
    assert_eq!(running(&swarm, waiting), 0, "{ps}");
    // Freed capacity places it.
    swarm.ok(0, &["service", "rm", placed]);
    swarm.wait("the waiting one runs once the other is gone", CONVERGE, || {
        running(&swarm, waiting) == 1
    });
}

#[test]
fn mounts_bind_tmpfs_and_volumes_and_bad_ones_are_refused() {
    require_root();
    let swarm = Swarm::new(1);
    swarm.init(&[]);
    let shared = std::env::temp_dir().join(format!("mesh-mount-{}", std::process::id()));
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello"), "from the node").unwrap();
    let bind_ro = format!("type=bind,src={},dst=/mnt,readonly", shared.display());
    let logs = probe(
        &swarm,
        "mounter",
        &[
            "--read-only",
            "--mount",
            &bind_ro,
            "--mount",
            "type=tmpfs,dst=/srv,tmpfs-size=1m",
            "--mount",
            "type=volume,src=state,dst=/media",
        ],
        &[
            "cat",
            "/mnt/hello",
            "write",
            "/mnt/x",
            "write",
            "/srv/small",
            "write-mib",
            "/srv/big:2",
            "write",
            "/media/kept",
            "write",
            "/root/elsewhere",
        ],
    );
    assert_eq!(outcome(&logs, "cat /mnt/hello"), "from the node", "{logs}");
    assert_eq!(outcome(&logs, "write /mnt/x"), "EROFS", "a readonly bind: {logs}");
    assert_eq!(
        outcome(&logs, "write-mib /srv/big:2"),
        "ENOSPC",
        "a 1 MiB tmpfs: {logs}"
    );
    assert_eq!(outcome(&logs, "write /srv/small"), "ok", "{logs}");
    assert_eq!(
        outcome(&logs, "write /media/kept"),
        "ok",
        "a writable volume in a read-only view: {logs}"
    );
    assert_eq!(outcome(&logs, "write /root/elsewhere"), "EROFS", "{logs}");
    assert!(
        !shared.join("x").exists() && !std::path::Path::new("/srv/small").exists(),
        "the node's files are untouched"
    );
    let volume = swarm.agents[0].data_dir.join("volumes/state/kept");
    assert!(volume.exists(), "the volume lives on the node: {}", volume.display());

    // A restarted task finds its volume as it left it.
    swarm.ok(0, &["service", "rm", "mounter"]);
    let logs = probe(
        &swarm,
        "again",
        &["--mount", "type=volume,src=state,dst=/media"],
        &["cat", "/media/kept"],
    );
    assert_eq!(outcome(&logs, "cat /media/kept"), "x", "{logs}");

    // A missing source or target: the task is rejected with the reason,
    // nothing is created on the node.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "missing",
            "--mount",
            "type=bind,src=/nonexistent-src,dst=/mnt",
            "--",
            "sleep",
            "600",
        ],
    );
    let mut ps = String::new();
    swarm.wait("the missing source refused", CONVERGE, || {
        ps = swarm.ok(0, &["service", "ps", "missing"]);
        ps.contains("does not exist on this node")
    });
    assert!(!std::path::Path::new("/nonexistent-src").exists());
    for (flags, reason) in [
        (&["--mount", "type=nfs,src=a,dst=/b"][..], "not supported"),
        (
            &["--mount", "type=bind,src=relative,dst=/mnt"][..],
            "absolute path of the node",
        ),
        (&["--mount", "type=tmpfs,dst=/proc/x"][..], "task's own"),
    ] {
        let mut args = vec!["service", "create", "--detach", "--name", "bad"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "sleep", "600"]);
        let (_, err) = swarm.fails(0, &args);
        assert!(err.contains(reason), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&shared);
}
