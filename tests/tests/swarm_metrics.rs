//! Kernel lane: every agent's Prometheus endpoint (`--metrics-addr`,
//! 127.0.0.1:9323 in each host's namespace). A 3-node swarm with a
//! published service under a few requests: one manager says it leads,
//! the managers count the nodes and tasks, each node counts the routing
//! mesh's packets and its tasks' connections, and `promtool check metrics`
//! (Debian's prometheus package, installed by `cargo xtask setup`) passes
//! on every agent's output, the one outside the swarm included.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{
    mesh::{metrics_get as get, sample as value, spray},
    overlay::running,
    require_root,
    swarm::Swarm,
};

const CONVERGE: Duration = Duration::from_secs(30);

fn promtool(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `cargo xtask setup` installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric deploy/grafana-dashboard.json asks for is one a manager
/// serves (so the dashboard does not drift from the agent).
fn dashboard_names_exist(text: &str) {
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana-dashboard.json"))
        .expect("deploy/grafana-dashboard.json");
    let mut rest = dashboard.as_str();
    let mut checked = 0;
    while let Some(at) = rest.find("mesh_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if name == "mesh_" || name.starts_with("mesh_overview") {
            continue;
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {} ", name.trim_end_matches("_bucket")))),
            "the dashboard asks for {name}, which the agent does not serve; its routing-mesh series:\n{}",
            text.lines()
                .filter(|l| l.contains("mesh_lb"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        checked += 1;
    }
    assert!(checked > 10, "the dashboard names its metrics");
}

#[test]
fn every_agent_serves_metrics_that_promtool_accepts() {
    require_root();
    let swarm = Swarm::new(4);
    swarm.form(3);
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
    // Every task takes connections (each node counts its own task's).
    swarm.wait("every node's 8080 answers, from every task", CONVERGE, || {
        let (failures, per_task, _) = spray(&swarm, 3, 3, 8080, 4);
        failures.is_empty() && per_task.len() == 3
    });
    let (failures, _, _) = spray(&swarm, 3, 3, 8080, 10);
    assert!(failures.is_empty(), "{failures:?}");

    // Host 0 is the manager (`form` makes the others workers).
    for host in 0..3 {
        let (status, text) = get(&swarm, host, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        promtool(&text);
        if host == 0 {
            assert_eq!(value(&text, "mesh_raft_is_leader"), Some(1.0), "{text}");
            assert_eq!(value(&text, "mesh_raft_elections_total"), Some(1.0), "{text}");
            for (series, n) in [
                (
                    "mesh_cluster_nodes{availability=\"active\",role=\"manager\",status=\"ready\"}",
                    1.0,
                ),
                (
                    "mesh_cluster_nodes{availability=\"active\",role=\"worker\",status=\"ready\"}",
                    2.0,
                ),
                ("mesh_cluster_tasks{desired=\"running\",state=\"running\"}", 3.0),
            ] {
                assert_eq!(value(&text, series), Some(n), "{series}:\n{text}");
            }
            // At least the 3 tasks (a task replaced after a failed start, or a
            // plan proposed again, counts once more).
            assert!(
                value(&text, "mesh_scheduler_decisions_total{outcome=\"placed\"}").is_some_and(|n| n >= 3.0),
                "{text}"
            );
            assert!(
                value(&text, "mesh_raft_proposal_duration_seconds_count").is_some_and(|n| n > 0.0),
                "{text}"
            );
            dashboard_names_exist(&text);
        } else {
            assert!(!text.contains("mesh_raft_term"), "a worker has no Raft: {text}");
        }
        assert_eq!(value(&text, "mesh_node_tasks{state=\"running\"}"), Some(1.0));
        let packets = value(
            &text,
            "mesh_lb_packets_total{kind=\"published\",port=\"8080\",protocol=\"tcp\",service=\"web\"}",
        );
        assert!(
            packets.is_some_and(|p| p > 0.0),
            "host {host} counts the mesh's packets:\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("mesh_lb_backend_connections_total{service=\"web\",task=")),
            "host {host} counts its task's connections:\n{text}"
        );
        assert!(text.contains("mesh_reconcile_duration_seconds_count{mechanism=\"mesh\"}"));
        println!(
            "host {host}: {} lines, e.g. {:?}",
            text.lines().count(),
            text.lines().find(|l| l.starts_with("mesh_lb_packets_total"))
        );
    }

    // The agent outside the swarm serves its own facts, and nothing else
    // is served.
    let (_, text) = get(&swarm, 3, "/metrics");
    promtool(&text);
    assert!(text.contains("state=\"inactive\""), "{text}");
    assert!(!text.contains("mesh_raft_term"));
    assert_eq!(get(&swarm, 3, "/other").0, "HTTP/1.1 404 Not Found");
    // A page elsewhere that rebinds its own name to 127.0.0.1 gets nothing.
    assert_eq!(
        mesh_tests::mesh::metrics_get_as(&swarm, 3, "/metrics", "attacker.example:9323").0,
        "HTTP/1.1 403 Forbidden"
    );
}
