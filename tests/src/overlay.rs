//! What the overlay tests ask of a swarm: network inspection through
//! `meshctl`, the overlay state in a host's kernel, and a way into a
//! task's network namespace.

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_agent::{
    agent::net::netns::NetNs,
    dataplane::{
        netlink::Netlink,
        vxlan::{self, OverlayState},
    },
};

use crate::swarm::Swarm;

/// `meshctl network inspect NETWORK` on host 0, parsed.
pub fn inspect(swarm: &Swarm, network: &str) -> serde_json::Value {
    let out = swarm.ok(0, &["network", "inspect", network]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("inspect prints JSON");
    list.into_iter().next().expect("one network")
}

/// (task, node, address) of every endpoint on `network`.
pub fn endpoints(swarm: &Swarm, network: &str) -> Vec<(String, String, Ipv4Addr)> {
    inspect(swarm, network)["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["task"].as_str().unwrap().to_string(),
                e["node"].as_str().unwrap_or("").to_string(),
                e["address"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// How many of `service`'s tasks are running and meant to be.
pub fn running(swarm: &Swarm, service: &str) -> usize {
    let out = swarm.ok(0, &["service", "ps", service, "--format", "json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    tasks
        .iter()
        .filter(|t| t["task"]["state"] == "Running" && t["task"]["desired"] == "Running")
        .count()
}

/// The VIP of `service` on its (first) network, from `service inspect`.
pub fn service_vip(swarm: &Swarm, service: &str) -> Ipv4Addr {
    let out = swarm.ok(0, &["service", "inspect", service]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("service inspect prints JSON");
    v[0]["service"]["vips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{service} has no VIP: {out}"))
        .parse()
        .expect("a VIP is an IPv4 address")
}

/// Runs `f` in the network namespace of `task` on host `host`.
pub fn in_task<T: Send>(swarm: &Swarm, host: usize, task: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = swarm.agents[host].data_dir.join("tasks").join(task).join("netns");
    NetNs::open_at(&path, "task")
        .expect("the task's namespace")
        .run(f)
        .expect("enter it")
}

/// The overlay networks in host `host`'s kernel.
pub fn overlays_on(swarm: &Swarm, host: usize) -> BTreeMap<u32, OverlayState> {
    swarm
        .cluster
        .host(host)
        .run(|| Netlink::run(|nl| async move { vxlan::observe(&nl).await }))
        .expect("read the overlays")
}

/// Whether host `host` has link `name` (asked over netlink: /sys shows
/// the namespace it was mounted in, not the thread's).
pub fn has_link(swarm: &Swarm, host: usize, name: &str) -> bool {
    let name = name.to_string();
    swarm
        .cluster
        .host(host)
        .run(move || Netlink::run(|nl| async move { nl.link_index(&name).await }))
        .is_ok()
}
