//! Kernel lane: secrets and configs. A 3-node swarm, a service
//! with one replica using a secret and a config: the task reads the right
//! bytes at the right path with the right mode (seen through
//! /proc/PID/root, i.e. inside the task's mount namespace); the secret is
//! nowhere in plain text in any node's data directory or log, and the node
//! itself never has the file; a config over an existing file is seen by
//! the task only; rotation with --secret-rm/--secret-add
//! replaces the task and the file; a secret in use cannot be removed; bad
//! input is refused with the reason.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use mesh_tests::{mesh::placed, overlay::running, require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);
const SECRET: &str = "s3cr3t-MESH-4711-do-not-leak";
const ROTATED: &str = "r0tated-MESH-0815-do-not-leak";

/// The task's PID, from its node's agent.
fn pid_of(swarm: &Swarm, host: usize, task: &str) -> u32 {
    let text = fs::read_to_string(swarm.agents[host].data_dir.join("tasks").join(task).join("pid"))
        .expect("the task's pid file");
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// A file as the task sees it: (content, mode).
fn in_task(pid: u32, path: &str) -> Option<(String, u32)> {
    let path = format!("/proc/{pid}/root{path}");
    let content = fs::read_to_string(&path).ok()?;
    let mode = fs::metadata(&path).ok()?.permissions().mode() & 0o777;
    Some((content, mode))
}

/// Files under `dir` (recursively) whose bytes contain `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            found.extend(holding(&path, needle));
        } else if kind.is_file() {
            if let Ok(bytes) = fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

fn nowhere_in_plain_text(swarm: &Swarm, needle: &str) {
    for (i, agent) in swarm.agents.iter().enumerate() {
        let mut found = holding(&agent.data_dir, needle.as_bytes());
        found.extend(holding(agent.log.parent().unwrap(), needle.as_bytes()));
        assert!(found.is_empty(), "host {i} holds the secret in plain text: {found:?}");
    }
    let node_side = Path::new("/run/secrets/pw");
    assert!(!node_side.exists(), "the node's own namespace never has the file");
}

#[test]
fn a_task_reads_its_secret_and_config_and_nothing_else_holds_them() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form(3);
    let out = swarm.meshctl_stdin(0, &["secret", "create", "--label", "app=db", "db_pw", "-"], SECRET);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = swarm.agents[0].data_dir.parent().unwrap().join("app.toml");
    fs::write(&config, "listen = 8080\n").unwrap();
    // A file the config is to replace, for the task only.
    let shadowed = swarm.agents[0].data_dir.parent().unwrap().join("shadowed.conf");
    fs::write(&shadowed, "the node's own\n").unwrap();
    let over = format!("source=app_conf,target={},mode=0440", shadowed.display());
    swarm.ok(0, &["config", "create", "app_conf", config.to_str().unwrap()]);
    let ls = swarm.ok(0, &["secret", "ls"]);
    assert!(ls.contains("db_pw") && ls.contains("CREATED"), "{ls}");
    let inspect = swarm.ok(0, &["secret", "inspect", "db_pw"]);
    assert!(
        !inspect.contains(SECRET) && inspect.contains("\"size\": 28"),
        "{inspect}"
    );
    assert!(swarm
        .ok(0, &["config", "inspect", "app_conf"])
        .contains("listen = 8080"));

    // Bad input, each refused with its reason.
    let empty = swarm.meshctl_stdin(0, &["secret", "create", "nothing", "-"], "");
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty"));
    let big = "x".repeat(500 * 1024 + 1);
    let too_big = swarm.meshctl_stdin(0, &["secret", "create", "big", "-"], &big);
    assert!(String::from_utf8_lossy(&too_big.stderr).contains("500 KiB"));
    for (args, why) in [
        (&["secret", "create", "x", "/no/such/file"][..], "cannot read"),
        (
            &["secret", "create", "db_pw", config.to_str().unwrap()][..],
            "already exists",
        ),
        (
            &["secret", "create", "bad name", config.to_str().unwrap()][..],
            "invalid secret name",
        ),
        (
            &[
                "service", "create", "--detach", "--name", "x", "--secret", "nope", "--", "sleep", "1",
            ][..],
            "secret nope not found",
        ),
        (
            &[
                "service",
                "create",
                "--detach",
                "--name",
                "x",
                "--secret",
                "source=db_pw,target=/etc/pw",
                "--",
                "sleep",
                "1",
            ][..],
            "/run/secrets",
        ),
    ] {
        let (_, err) = swarm.fails(0, args);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(
        swarm.ok(0, &["secret", "ls", "-q"]).lines().count(),
        1,
        "nothing was half-created"
    );
    // The limit itself is taken, through the local socket and the store.
    let limit: String = (0..500 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let out = swarm.meshctl_stdin(0, &["secret", "create", "at_limit", "-"], &limit);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(swarm
        .ok(0, &["secret", "inspect", "at_limit"])
        .contains(&format!("\"size\": {}", 500 * 1024)));
    swarm.ok(0, &["secret", "rm", "at_limit"]);

    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "app",
            "--secret",
            "source=db_pw,target=pw,mode=0400",
            "--config",
            "app_conf",
            "--config",
            &over,
            "--",
            "sleep",
            "3600",
        ],
    );
    swarm.wait("the app task running", CONVERGE, || running(&swarm, "app") == 1);
    let (host, task) = placed(&swarm, "app").remove(0);
    let pid = pid_of(&swarm, host, &task);
    assert_eq!(in_task(pid, "/run/secrets/pw"), Some((SECRET.to_string(), 0o400)));
    assert_eq!(
        in_task(pid, "/run/configs/app_conf"),
        Some(("listen = 8080\n".to_string(), 0o444))
    );
    assert_eq!(
        in_task(pid, shadowed.to_str().unwrap()),
        Some(("listen = 8080\n".to_string(), 0o440)),
        "the config over an existing file, in the task"
    );
    assert_eq!(
        fs::read_to_string(&shadowed).unwrap(),
        "the node's own\n",
        "the node's file is untouched"
    );
    nowhere_in_plain_text(&swarm, SECRET);
    let (_, err) = swarm.fails(0, &["secret", "rm", "db_pw"]);
    assert!(err.contains("in use by service app"), "{err}");

    // Rotation: a new secret under a new name, the task replaced.
    let out = swarm.meshctl_stdin(0, &["secret", "create", "db_pw2", "-"], ROTATED);
    assert!(out.status.success());
    swarm.ok(
        0,
        &[
            "service",
            "update",
            "--detach",
            "--secret-rm",
            "db_pw",
            "--secret-add",
            "source=db_pw2,target=pw",
            "app",
        ],
    );
    let (mut now, mut pid) = (None, 0);
    swarm.wait("a new task reading the rotated secret", CONVERGE, || {
        let Some((host, task)) = placed(&swarm, "app").into_iter().next() else {
            return false;
        };
        pid = pid_of(&swarm, host, &task);
        now = in_task(pid, "/run/secrets/pw");
        now.as_ref().is_some_and(|(c, _)| c == ROTATED)
    });
    assert_eq!(now.unwrap().1, 0o444, "the default mode");
    swarm.ok(0, &["secret", "rm", "db_pw"]);
    nowhere_in_plain_text(&swarm, ROTATED);

    swarm.ok(0, &["service", "rm", "app"]);
    swarm.wait("the app task gone", CONVERGE, || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    swarm.ok(0, &["secret", "rm", "db_pw2"]);
    swarm.ok(0, &["config", "rm", "app_conf"]);
    assert!(swarm.ok(0, &["secret", "ls", "-q"]).trim().is_empty());
    nowhere_in_plain_text(&swarm, ROTATED);
    nowhere_in_plain_text(&swarm, SECRET);
}
