//! Kernel lane: services scheduled over a real swarm (issue 4, in progress:
//! tasks are placed and assigned; the runtime that starts them comes next).

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);

/// Live (desired Running) tasks per node hostname, from `service ps`.
fn placement(swarm: &Swarm, service: &str) -> BTreeMap<String, usize> {
    let out = swarm.meshctl(0, &["service", "ps", "--format", "json", service]);
    let tasks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut m = BTreeMap::new();
    for t in tasks.iter().filter(|t| t["task"]["desired"] == "Running") {
        let node = t["node_hostname"].as_str().unwrap_or("-").to_string();
        *m.entry(node).or_default() += 1;
    }
    m
}

#[test]
fn services_spread_scale_follow_drains_and_go_away() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.join(2, 0, "worker");
    swarm.wait("3 nodes ready", CONVERGE, || swarm.ready(0) == 3);

    let id = swarm.ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "6",
            "--",
            "sleep",
            "1000",
        ],
    );
    assert_eq!(id.trim().len(), 13, "prints the service ID: {id}");
    let even: BTreeMap<String, usize> = [("h0".into(), 2), ("h1".into(), 2), ("h2".into(), 2)].into();
    swarm.wait("6 tasks spread 2/2/2", CONVERGE, || placement(&swarm, "web") == even);
    let ls = swarm.ok(0, &["service", "ls"]);
    assert!(
        ls.contains("web") && ls.contains("replicated") && ls.contains("/6") && ls.contains("sleep 1000"),
        "{ls}"
    );
    let ps = swarm.ok(0, &["service", "ps", "web"]);
    assert!(ps.contains("web.1") && ps.contains("Assigned"), "{ps}");

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
            "service", "create", "--name", "agent", "--mode", "global", "--", "sleep", "1000",
        ],
    );
    assert!(!global.trim().is_empty());
    swarm.wait("a global task on every active node", CONVERGE, || {
        placement(&swarm, "agent") == [("h0".into(), 1), ("h2".into(), 1)].into()
    });

    swarm.ok(0, &["service", "rm", "web", "agent"]);
    assert!(swarm.ok(0, &["service", "ls", "-q"]).trim().is_empty());
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
        (&["--name", "web", "--", "true"], 4, "already exists"),
        (&["--name", "bad name", "--", "true"], 2, "invalid service name"),
        (&["--name", "e", "--replicas", "-1", "--", "true"], 2, ""),
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
}
