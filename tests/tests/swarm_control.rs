//! Kernel lane: the control plane end to end. Real agents in host
//! namespaces, driven by the real meshctl, over mutual TLS on the underlay.

use std::{collections::BTreeSet, time::Duration};

use mesh_tests::{require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);

/// Every file under the swarm's data directories, as bytes.
fn data_files(swarm: &Swarm) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    let mut out = Vec::new();
    for a in &swarm.agents {
        walk(&a.data_dir, &mut out);
    }
    out
}

fn assert_not_on_disk(swarm: &Swarm, secret: &str) {
    for (path, bytes) in data_files(swarm) {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret:.20}... found in plain text in {path}"
        );
    }
}

fn managers_agree(swarm: &Swarm, managers: &[usize], total: usize) -> bool {
    let views: Vec<_> = managers.iter().map(|m| swarm.nodes(*m)).collect();
    views.iter().all(|v| {
        v.len() == total
            && v.iter().all(|(_, status, _, _)| status == "Ready")
            && v.iter().filter(|n| n.3 == "Leader").count() == 1
            && v.iter().filter(|n| n.3 == "Reachable").count() == managers.len() - 1
    }) && views.windows(2).all(|w| w[0] == w[1])
}

#[test]
fn three_managers_and_two_workers_form_a_swarm_from_the_cli() {
    require_root();
    let swarm = Swarm::new(5);
    let out = swarm.init(&[]);
    assert!(out.contains("Swarm initialized"), "{out}");
    assert!(out.contains("meshctl swarm join --token MESHTKN-1-"), "{out}");
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.join(3, 0, "worker");
    swarm.join(4, 1, "worker"); // through a follower: forwarded to the leader
    swarm.wait("node ls to agree on every manager", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 5)
    });
    let ls = swarm.ok(0, &["node", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(" *") && l.contains("h0")),
        "self is starred:\n{ls}"
    );
    let ids: BTreeSet<String> = swarm.ok(1, &["node", "ls", "-q"]).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 5);

    // A worker cannot read or change cluster state.
    let (code, err) = swarm.fails(3, &["node", "ls"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not a swarm manager"), "{err}");

    // Tokens and keys are nowhere in plain text on any node.
    let worker_token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]);
    let manager_token = swarm.ok(0, &["swarm", "join-token", "-q", "manager"]);
    assert_not_on_disk(&swarm, worker_token.trim());
    assert_not_on_disk(&swarm, manager_token.trim());
    assert_not_on_disk(&swarm, "PRIVATE KEY");
}

#[test]
fn leader_loss_keeps_every_acknowledged_write_and_the_old_leader_catches_up() {
    require_root();
    let mut swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.wait("3 managers", CONVERGE, || managers_agree(&swarm, &[0, 1, 2], 3));

    // Writes through a follower; the leader dies after the 10th. Bounded in
    // count (200) and time (30 s).
    let mut acknowledged = Vec::new();
    let mut after_kill = 0;
    let mut last_error = String::new();
    let started = std::time::Instant::now();
    for n in 0..200 {
        if n == 10 {
            swarm.kill(0); // the leader (the node that ran init)
        }
        let label = format!("w{n}=1");
        let out = swarm.meshctl(1, &["node", "update", "--label-add", &label, "h1"]);
        if out.status.success() {
            acknowledged.push(format!("w{n}"));
            after_kill += usize::from(n >= 10);
        } else {
            last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        if after_kill >= 20 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    if after_kill == 0 {
        swarm.dump_logs();
    }
    assert!(
        after_kill > 0,
        "no write committed after the leader died; last error: {last_error}"
    );
    swarm.start(0);
    swarm.wait("old leader back and caught up", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 3) && {
            let inspect = swarm.meshctl(0, &["node", "inspect", "h1"]);
            let text = String::from_utf8_lossy(&inspect.stdout).into_owned();
            acknowledged.iter().all(|k| text.contains(&format!("\"{k}\"")))
        }
    });
}

#[test]
fn a_partitioned_manager_cannot_commit_and_converges_after_healing() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.wait("3 managers", CONVERGE, || managers_agree(&swarm, &[0, 1, 2], 3));
    swarm.cluster.partition(2).expect("partition h2");
    let minority = swarm.meshctl(2, &["node", "update", "--label-add", "minority=1", "h2"]);
    assert!(!minority.status.success(), "the minority committed a write");
    assert_eq!(
        minority.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&minority.stderr)
    );
    swarm.ok(0, &["node", "update", "--label-add", "majority=1", "h2"]);
    swarm.cluster.heal(2).expect("heal h2");
    swarm.wait("h2 sees the majority's write", CONVERGE, || {
        let text = String::from_utf8_lossy(&swarm.meshctl(2, &["node", "inspect", "h2"]).stdout).into_owned();
        text.contains("\"majority\"") && !text.contains("\"minority\"")
    });
}

#[test]
fn restarted_nodes_rejoin_and_an_autolocked_manager_stays_locked_until_unlocked() {
    require_root();
    let mut swarm = Swarm::new(2);
    let out = swarm.init(&["--autolock"]);
    let key = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("MESHKEY-1-"))
        .expect("init prints the unlock key")
        .to_string();
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || {
        swarm.nodes(0).iter().filter(|n| n.1 == "Ready").count() == 2
    });
    assert_not_on_disk(&swarm, &key);

    // A worker restarted with its data directory comes back by itself.
    swarm.kill(1);
    swarm.wait("h1 down", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Down")
    });
    swarm.start(1);
    swarm.wait("h1 ready again", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Ready")
    });

    // The autolocked manager restarts locked.
    swarm.kill(0);
    swarm.start(0);
    assert!(swarm.ok(0, &["info"]).contains("Swarm: locked"));
    let (code, err) = swarm.fails(0, &["node", "ls"]);
    assert_eq!(code, 6, "{err}");
    let wrong = swarm.meshctl_stdin(
        0,
        &["swarm", "unlock"],
        "MESHKEY-1-0000000000000000000000000000000000000000000000000000000000000000\n",
    );
    assert_eq!(
        wrong.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let garbage = swarm.meshctl_stdin(0, &["swarm", "unlock"], "not-a-key\n");
    assert_eq!(garbage.status.code(), Some(2));
    assert!(
        swarm.ok(0, &["info"]).contains("Swarm: locked"),
        "failed unlocks change nothing"
    );
    let right = swarm.meshctl_stdin(0, &["swarm", "unlock"], &format!("{key}\n"));
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    swarm.wait("both nodes ready after unlock", CONVERGE, || {
        swarm.nodes(0).iter().filter(|n| n.1 == "Ready").count() == 2
    });
}

#[test]
fn bad_tokens_and_bad_input_are_refused_and_change_nothing() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    // A second, separate swarm on h1.
    let h1 = swarm.cluster.host(1).address().to_string();
    swarm.ok(1, &["swarm", "init", "--advertise-addr", &h1]);
    let remote = format!("{}:2377", swarm.cluster.host(0).address());
    let h2 = swarm.cluster.host(2).address().to_string();
    let join = |token: &str| {
        swarm.meshctl(
            2,
            &["swarm", "join", "--token", token, "--advertise-addr", &h2, &remote],
        )
    };
    let good = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]).trim().to_string();
    let other = swarm.ok(1, &["swarm", "join-token", "-q", "worker"]).trim().to_string();

    // Right CA, wrong secret.
    let (prefix, _) = good.rsplit_once('-').unwrap();
    let wrong_secret = format!("{prefix}-{}", "0".repeat(good.len() - prefix.len() - 1));
    let out = join(&wrong_secret);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid join token"));
    // Another swarm's token: h0 does not present that CA.
    let out = join(&other);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be verified against the token"));
    // A tampered CA digest.
    let mut tampered = good.clone().into_bytes();
    let at = "MESHTKN-1-".len() + 3;
    tampered[at] = if tampered[at] == b'a' { b'b' } else { b'a' };
    let out = join(std::str::from_utf8(&tampered).unwrap());
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    // Not a token at all.
    let out = join("hello");
    assert_eq!(out.status.code(), Some(2));
    // Nothing changed: h2 is in no swarm, h0's swarm has one node.
    assert!(swarm.ok(2, &["info"]).contains("Swarm: inactive"));
    assert_eq!(swarm.ok(0, &["node", "ls", "-q"]).lines().count(), 1);

    // Bad CLI input.
    assert_eq!(swarm.fails(0, &["node", "inspect", "nosuchnode"]).0, 3);
    assert_eq!(
        swarm
            .fails(2, &["swarm", "init", "--default-addr-pool", "10.0.0.1/8"])
            .0,
        2
    );
    assert_eq!(swarm.fails(2, &["swarm", "init", "--advertise-addr", "not-an-ip"]).0, 2);
    assert!(swarm.ok(2, &["info"]).contains("Swarm: inactive"));
    let (code, err) = swarm.fails(0, &["node", "demote", "h0"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("last manager"), "{err}");
    assert_eq!(swarm.fails(0, &["node", "update", "--label-add", "=x", "h0"]).0, 2);
    let ls = swarm.nodes(0);
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0].3, "Leader");
}
