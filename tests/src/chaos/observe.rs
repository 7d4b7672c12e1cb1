//! What the chaos run observes of the hosts from outside the agents: each
//! node's kernel objects (through `ip`, `bridge`, `nft`, `tc` and the tcx
//! query, as tests may and the agent may not) and the task processes its
//! PID files account for.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::Duration,
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use mesh_agent::agent::tasks::process::start_time;

use super::{differences, NODES};
use crate::{
    process::{descends_from, processes_with},
    swarm::Swarm,
};

/// Every node's differences between two snapshots of them all.
pub(super) fn differences_from(before: &[BTreeSet<String>], after: &[BTreeSet<String>]) -> Vec<String> {
    NODES
        .iter()
        .zip(before.iter().zip(after))
        .flat_map(|(host, (before, after))| differences(*host, before, after))
        .collect()
}

pub(super) fn snapshot_all(swarm: &Swarm) -> Vec<BTreeSet<String>> {
    NODES.iter().map(|n| kernel_objects(swarm, *n)).collect()
}

/// A host's kernel objects as comparable lines: links (kind, XDP), IPv4
/// and global IPv6 addresses, routes of every table, permanent neighbours
/// and static forwarding entries, the nftables ruleset, TC qdiscs and
/// filters and tcx programs on every link, and under the agent's data
/// directory its pinned BPF objects and its mounts (task namespaces,
/// bpffs, staged files). Observed with `ip`, `bridge`, `nft`, `tc`.
pub fn kernel_objects(swarm: &Swarm, host: usize) -> BTreeSet<String> {
    let mut objects = BTreeSet::new();
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let program = args[0];
        let mut cmd = Command::new(program);
        cmd.args(&args[1..]);
        swarm
            .cluster
            .host(host)
            .output(cmd, Duration::from_secs(10))
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
    let mut links = Vec::new();
    for l in json(&["ip", "-j", "-d", "link", "show"]) {
        let name = text(&l, "ifname");
        let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("-");
        let xdp = if l.get("xdp").is_some() { " xdp" } else { "" };
        objects.insert(format!("link {name} {kind}{xdp}"));
        links.push(name);
    }
    for l in json(&["ip", "-j", "addr", "show"]) {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let scope = text(a, "scope");
            if scope == "link" && text(a, "family") == "inet6" {
                continue; // fe80::/64 follows the link, which is compared
            }
            objects.insert(format!(
                "address {} {}/{}",
                text(&l, "ifname"),
                text(a, "local"),
                a["prefixlen"]
            ));
        }
    }
    for family in ["-4", "-6"] {
        for r in json(&["ip", "-j", family, "route", "show", "table", "all"]) {
            if text(&r, "dst").starts_with("fe80:") || text(&r, "dst").starts_with("ff00:") {
                continue; // per-link IPv6 routes follow the link
            }
            objects.insert(format!(
                "route {} {} dev {} table {} {}",
                text(&r, "type"),
                text(&r, "dst"),
                text(&r, "dev"),
                r["table"].as_str().unwrap_or("main"),
                text(&r, "gateway")
            ));
        }
    }
    for n in json(&["ip", "-j", "neigh", "show", "nud", "permanent"]) {
        objects.insert(format!(
            "neighbour {} {} {}",
            text(&n, "dev"),
            text(&n, "dst"),
            text(&n, "lladdr")
        ));
    }
    for f in json(&["bridge", "-j", "fdb", "show"]) {
        let state = text(&f, "state");
        if state == "permanent" || state == "static" {
            objects.insert(format!(
                "fdb {} {} {} {}",
                text(&f, "ifname"),
                text(&f, "mac"),
                text(&f, "dst"),
                state
            ));
        }
    }
    let mut nft = Command::new("nft");
    nft.args(["list", "ruleset"]);
    if let Ok(out) = swarm.cluster.host(host).output(nft, Duration::from_secs(10)) {
        for (n, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
            objects.insert(format!("nft {n:04} {}", line.trim()));
        }
    }
    for link in &links {
        for q in json(&["tc", "-j", "qdisc", "show", "dev", link]) {
            objects.insert(format!("qdisc {link} {} {}", text(&q, "kind"), text(&q, "handle")));
        }
        for dir in ["ingress", "egress"] {
            for f in json(&["tc", "-j", "filter", "show", "dev", link, dir]) {
                objects.insert(format!("tc filter {link} {dir} {} {}", text(&f, "kind"), f["options"]));
            }
        }
        for (dir, attach) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
            let names: Vec<String> = swarm.cluster.host(host).run(|| {
                SchedClassifier::query_tcx(link, attach)
                    .map(|(_, programs)| {
                        programs
                            .iter()
                            .map(|p| p.name_as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            for name in names {
                objects.insert(format!("tcx {link} {dir} {name}"));
            }
        }
    }
    let data_dir = &swarm.agents[host].data_dir;
    for pin in files_under(&data_dir.join("bpf")) {
        objects.insert(format!("pinned {pin}"));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        if let Ok(rest) = Path::new(point).strip_prefix(data_dir) {
            let fstype = line
                .split(" - ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .unwrap_or("?");
            objects.insert(format!("mount {} {fstype}", rest.display()));
        }
    }
    objects
}

/// Paths under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().filter_map(Result::ok) {
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

/// Per node, the tasks whose recorded process is alive (the PID file's
/// start time still matches, so a reused PID is not taken for a task).
pub(super) fn live_tasks(swarm: &Swarm) -> BTreeMap<usize, BTreeSet<String>> {
    NODES
        .iter()
        .map(|n| (*n, live_under(&swarm.agents[*n].data_dir.join("tasks"))))
        .collect()
}

fn live_under(dir: &Path) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(entry.path().join("pid")) else {
            continue;
        };
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pid)), Some(Ok(start))) = (fields.next(), fields.next()) {
            if u32::try_from(pid).is_ok_and(|pid| start_time(pid) == Some(start)) {
                live.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    live
}

/// The service's processes that no node's PID files account for (a task's
/// program runs under the init process its node records).
pub(super) fn stray_processes(swarm: &Swarm, marker: &str) -> Vec<String> {
    let recorded: BTreeSet<u32> = NODES
        .iter()
        .flat_map(|n| {
            let dir = swarm.agents[*n].data_dir.join("tasks");
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
                .filter_map(|t| t.split_whitespace().next()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    processes_with(marker)
        .into_iter()
        .filter(|pid| !descends_from(*pid, &recorded) && *pid != std::process::id())
        .map(|pid| format!("process {pid} runs the service's command, recorded by no node"))
        .collect()
}
