//! Kernel lane: overlay networks in the cluster store: create,
//! list, inspect, remove; subnets and VNIs allocated once for the swarm;
//! task addresses handed out per network; bad input refused.

use std::time::Duration;

use mesh_tests::{overlay::inspect, require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);

#[test]
fn networks_are_allocated_once_listed_inspected_and_removed_when_unused() {
    require_root();
    let swarm = Swarm::new(2);
    swarm.init(&[
        "--default-addr-pool",
        "10.20.0.0/23",
        "--default-addr-pool-mask-length",
        "24",
    ]);
    swarm.join(1, 0, "manager");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);

    swarm.ok(0, &["network", "create", "--driver", "overlay", "app"]);
    swarm.ok(
        1,
        &["network", "create", "--subnet", "192.168.77.0/24", "--attachable", "db"],
    );
    swarm.ok(
        0,
        &[
            "network",
            "create",
            "--subnet",
            "192.168.78.0/24",
            "--opt",
            "encrypted",
            "vault",
        ],
    );
    let app = inspect(&swarm, "app");
    assert_eq!(app["network"]["subnet"], "10.20.0.0/24");
    assert_eq!(app["network"]["gateway"], "10.20.0.1");
    assert_eq!(app["network"]["vni"], 4096);
    let db = inspect(&swarm, "db");
    assert_eq!(db["network"]["vni"], 4097);
    assert_eq!(db["network"]["encryption"], "None");
    assert_eq!(inspect(&swarm, "vault")["network"]["encryption"], "WireGuard");
    assert_eq!(db["network"]["attachable"], true);
    let table = swarm.ok(1, &["network", "ls"]);
    for want in ["NETWORK ID", "NAME", "DRIVER", "SCOPE", "app", "db", "overlay", "swarm"] {
        assert!(table.contains(want), "missing {want}:\n{table}");
    }
    assert_eq!(swarm.ok(0, &["network", "ls", "-q"]).lines().count(), 3);

    // A service on both networks: every task has one address on each.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "app",
            "--network",
            "db",
            "--",
            "sleep",
            "1000",
        ],
    );
    let app = inspect(&swarm, "app");
    let endpoints = app["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{app}");
    let mut addresses: Vec<&str> = endpoints.iter().map(|e| e["address"].as_str().unwrap()).collect();
    addresses.sort();
    // The service's virtual IP takes the first free address, as Swarm's does.
    assert_eq!(addresses, vec!["10.20.0.3", "10.20.0.4", "10.20.0.5"]);
    let web: serde_json::Value = serde_json::from_str(&swarm.ok(0, &["service", "inspect", "web"])).unwrap();
    assert_eq!(web[0]["service"]["vips"][0]["address"], "10.20.0.2", "{web}");
    assert_eq!(app["services"], serde_json::json!(["web"]));
    assert!(!app["peers"].as_array().unwrap().is_empty());
    assert_eq!(inspect(&swarm, "db")["endpoints"].as_array().unwrap().len(), 3);

    // In use: refused, and nothing changes.
    let (code, err) = swarm.fails(0, &["network", "rm", "app"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("in use by service web"), "{err}");

    // Bad input, each with its reason; nothing is created.
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--subnet", "10.20.0.0/16", "x"], 2, "overlaps network app"),
        (
            &["--subnet", "172.30.0.0/24", "--gateway", "172.31.0.1", "x"],
            2,
            "outside --subnet",
        ),
        (&["--driver", "bridge", "x"], 2, "not supported"),
        (&["app"], 4, "already exists"),
        (&["bad name"], 2, "invalid network name"),
        (&["--opt", "mtu=100", "x"], 2, "out of range"),
    ];
    for (args, code, text) in cases {
        let mut full = vec!["network", "create"];
        full.extend_from_slice(args);
        let (got, err) = swarm.fails(0, &full);
        assert_eq!(got, *code, "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
    }
    // The pool's second /24 is still free; after it the pool is exhausted.
    swarm.ok(0, &["network", "create", "second"]);
    let (code, err) = swarm.fails(0, &["network", "create", "third"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no free /24"), "{err}");
    assert_eq!(swarm.ok(0, &["network", "ls", "-q"]).lines().count(), 4);
    let (code, err) = swarm.fails(
        0,
        &["service", "create", "--name", "x", "--network", "nosuch", "--", "true"],
    );
    assert_eq!(code, 3, "{err}");

    // Once the service is gone and its tasks ended, the network goes too,
    // and its subnet and VNI are free again.
    swarm.ok(0, &["service", "rm", "web"]);
    swarm.wait("app unused", CONVERGE, || {
        swarm.meshctl(0, &["network", "rm", "app"]).status.success()
    });
    swarm.ok(0, &["network", "create", "third"]);
    let third = inspect(&swarm, "third");
    assert_eq!(third["network"]["subnet"], "10.20.0.0/24");
    assert_eq!(third["network"]["vni"], 4096);
}

/// The node's task bridge is asked for by a task's attach and by the
/// routing mesh at once: every caller succeeds, whoever made it first
/// (a task was once rejected with "File exists" for losing that race).
#[test]
fn the_node_bridge_is_made_once_whoever_asks_for_it_at_the_same_time() {
    use mesh_agent::agent::net::bridge::{check_local_pool, LocalNetwork, BRIDGE};
    require_root();
    let cluster = mesh_tests::Cluster::new(1).expect("a host");
    let results = cluster.host(0).run(|| {
        let pool = check_local_pool("172.18.0.0/16").unwrap();
        // Threads made here share the host's network namespace.
        let callers: Vec<_> = (0..16)
            .map(|_| {
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime
                        .block_on(LocalNetwork::new(pool).ensure_bridge())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        callers.into_iter().map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let out = cluster
        .host(0)
        .output(
            {
                let mut ip = std::process::Command::new("ip");
                ip.args(["-4", "-o", "addr", "show", "dev", BRIDGE]);
                ip
            },
            Duration::from_secs(10),
        )
        .expect("ip addr");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("172.18.0.1/16").count(), 1, "{text}");
}
