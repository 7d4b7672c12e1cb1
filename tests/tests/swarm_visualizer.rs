//! Kernel lane: the swarm visualizer (`mesh-agent run --visualizer-addr`).
//! A 3-node swarm, a service scaled from 2 to 5 tasks; headless Chromium
//! (Debian's package, installed by `cargo xtask setup`) loads the
//! manager's page inside host 0's namespace, runs its script (server-sent
//! events) and the page shows the 5 tasks on their nodes. A screenshot is
//! kept as target/visualizer.png.

use std::{path::PathBuf, process::Command, time::Duration};

use mesh_tests::{overlay::running, require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);
const FLAGS: &[&str] = &[
    "--raft-heartbeat",
    "100ms",
    "--raft-election-timeout",
    "500ms",
    "--visualizer-addr",
    "127.0.0.1:8088",
];
const PAGE: &str = "http://127.0.0.1:8088/";

/// Headless Chromium on host 0 with `args` and the page; its stdout.
fn chromium(swarm: &Swarm, args: &[&str]) -> String {
    let mut c = Command::new("chromium");
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .args(["--virtual-time-budget=5000", "--window-size=1000,560"])
        .args(args)
        .arg(PAGE)
        .env("HOME", std::env::temp_dir());
    let out = swarm
        .cluster
        .host(0)
        .output(c, Duration::from_secs(90))
        .expect("chromium (Debian's package; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_page_shows_the_tasks_as_the_service_scales() {
    require_root();
    let swarm = Swarm::with_flags(3, FLAGS);
    swarm.form(3);
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "2",
            "--",
            "sleep",
            "3600",
        ],
    );
    swarm.wait("2 web tasks running", CONVERGE, || running(&swarm, "web") == 2);
    let dom = chromium(&swarm, &["--dump-dom"]);
    assert_eq!(dom.matches("data-service=\"web\"").count(), 2, "{dom}");

    swarm.ok(0, &["service", "scale", "web=5"]);
    swarm.wait("5 web tasks running", CONVERGE, || running(&swarm, "web") == 5);
    let dom = chromium(&swarm, &["--dump-dom"]);
    assert_eq!(
        dom.matches("data-service=\"web\" data-state=\"running\"").count(),
        5,
        "the page shows the 5 running tasks: {dom}"
    );
    for node in ["h0", "h1", "h2"] {
        assert!(dom.contains(&format!("data-node=\"{node}\"")), "a column for {node}");
    }
    assert!(dom.contains("3 nodes · 1 services · 5/5 tasks running"), "{dom}");

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/visualizer.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&swarm, &[&format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "a screenshot at {}",
        shot.display()
    );
    println!("screenshot: {}", shot.display());
}
