//! Kernel lane: service discovery. Every service on an overlay
//! network gets a virtual IP there; inside each task the agent answers DNS
//! on 127.0.0.11: `NAME` -> the VIP (or, in endpoint mode dnsrr, the task
//! addresses), `tasks.NAME` -> the running tasks' addresses, only for
//! services on the task's own networks, and the records follow the tasks.
//! The task's own resolver (its /etc/resolv.conf) asks there, and its
//! connections to a VIP reach the service's tasks.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use mesh_tests::mesh::placed;
use mesh_tests::{
    mesh::dns_a,
    overlay::{in_task, running, service_vip},
    require_root,
    swarm::{binary, Swarm},
};

const CONVERGE: Duration = Duration::from_secs(30);

/// The task addresses of `service` on its (only) network.
fn task_addresses(swarm: &Swarm, service: &str) -> BTreeSet<Ipv4Addr> {
    let out = swarm.ok(0, &["service", "ps", service, "--format", "json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    tasks
        .iter()
        .filter(|t| t["task"]["state"] == "Running" && t["task"]["desired"] == "Running")
        .filter_map(|t| t["task"]["attachments"][0]["address"].as_str()?.parse().ok())
        .collect()
}

fn ask(swarm: &Swarm, (host, task): &(usize, String), name: &str) -> Result<BTreeSet<Ipv4Addr>, String> {
    let name = name.to_string();
    in_task(swarm, *host, task, move || dns_a(&name)).map(|v| v.into_iter().collect())
}

#[test]
fn tasks_resolve_services_on_their_networks_to_vips_and_task_addresses_that_follow_the_tasks() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.form(3);
    swarm.ok(0, &["network", "create", "--driver", "overlay", "front"]);
    swarm.ok(0, &["network", "create", "--driver", "overlay", "back"]);
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "api",
            "--replicas",
            "2",
            "--network",
            "front",
            "--",
            echo,
            "7000",
        ],
    );
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "db",
            "--endpoint-mode",
            "dnsrr",
            "--replicas",
            "2",
            "--network",
            "front",
            "--",
            echo,
            "7000",
        ],
    );
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "hidden",
            "--network",
            "back",
            "--",
            echo,
            "7000",
        ],
    );
    // A task whose resolver is the task's own /etc/resolv.conf.
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "lookup",
            "--network",
            "front",
            "--",
            "sh",
            "-c",
            "while true; do getent ahostsv4 api | head -n 1; sleep 1; done",
        ],
    );
    swarm.wait("every task running", CONVERGE, || {
        running(&swarm, "api") == 2
            && running(&swarm, "db") == 2
            && running(&swarm, "hidden") == 1
            && running(&swarm, "lookup") == 1
    });
    let client = placed(&swarm, "lookup").remove(0);
    let api_vip = service_vip(&swarm, "api");
    assert!(
        swarm.ok(0, &["service", "inspect", "db"]).contains("\"vips\": []"),
        "a dnsrr service has no VIP"
    );

    swarm.wait("api resolves to its VIP", CONVERGE, || {
        ask(&swarm, &client, "api") == Ok(BTreeSet::from([api_vip]))
    });
    swarm.wait("tasks.api resolves to its tasks", CONVERGE, || {
        ask(&swarm, &client, "tasks.api") == Ok(task_addresses(&swarm, "api"))
    });
    assert_eq!(
        ask(&swarm, &client, "TASKS.Api").unwrap().len(),
        2,
        "names are case-insensitive"
    );
    swarm.wait("db (dnsrr) resolves to its tasks", CONVERGE, || {
        ask(&swarm, &client, "db") == Ok(task_addresses(&swarm, "db"))
    });
    let hidden = ask(&swarm, &client, "hidden");
    assert_eq!(
        hidden,
        Err("rcode 3".to_string()),
        "a service on another network is not known here (NXDOMAIN, not asked outside)"
    );

    // The records follow the tasks.
    swarm.ok(0, &["service", "scale", "api=3"]);
    swarm.wait("3 api tasks", CONVERGE, || running(&swarm, "api") == 3);
    swarm.wait("tasks.api lists 3", CONVERGE, || {
        ask(&swarm, &client, "tasks.api").map(|s| s.len()) == Ok(3)
    });
    assert_eq!(
        ask(&swarm, &client, "api"),
        Ok(BTreeSet::from([api_vip])),
        "the VIP stays"
    );

    // The task's own resolver asks the responder.
    swarm.wait("getent in the task resolves api", CONVERGE, || {
        swarm
            .ok(0, &["service", "logs", "lookup"])
            .contains(&api_vip.to_string())
    });

    // East-west through the VIP: a task connects to `api` by name; the
    // connections spread over api's tasks, and the task sees the VIP as
    // its peer (TCP) and as the sender of the answers (UDP).
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "probe",
            "--network",
            "front",
            "--restart-condition",
            "none",
            "--",
            echo,
            "--connect",
            "api",
            "7000",
            "30",
        ],
    );
    let mut logs = String::new();
    swarm.wait("the probe finished", CONVERGE, || {
        logs = swarm.ok(0, &["service", "logs", "probe"]);
        logs.lines().filter(|l| l.contains("udp ")).count() == 30
    });
    let vip_port = format!("{api_vip}:7000");
    let tcp: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split_once("tcp ").map(|(_, r)| r))
        .collect();
    assert_eq!(tcp.len(), 30, "{logs}");
    let mut served = BTreeSet::new();
    for line in &tcp {
        let (peer, task) = line.split_once(' ').unwrap_or((line, ""));
        assert_eq!(peer, vip_port, "getpeername shows the VIP: {logs}");
        served.insert(task.to_string());
    }
    println!("connections through the VIP per task: {served:?}");
    assert!(
        served.len() >= 2,
        "connections to the VIP spread over the tasks: {served:?}"
    );
    let udp: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split_once("udp ").map(|(_, r)| r))
        .collect();
    assert!(
        udp.iter()
            .all(|l| l.starts_with(&format!("{vip_port} ")) && l.ends_with(" datagram")),
        "UDP answers come from the VIP: {logs}"
    );
}
