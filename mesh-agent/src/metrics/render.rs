//! The text exposition format of a [`Snapshot`] and the instruments, one
//! function per family of metrics.

use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use super::{
    counted::instruments,
    snapshot::{BackendFacts, PortFacts, Snapshot, TunnelPeerFacts},
};

/// The text exposition of `snapshot` and the instruments.
pub(crate) fn render(snapshot: &Snapshot) -> String {
    let r = Registry::new();
    for family in [agent_info, raft, cluster, node, mesh_ports, mesh_backends, wireguard] {
        family(&r, snapshot);
    }
    let mut families = r.gather();
    families.extend(instruments().registry.gather());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("reason: encoding into memory does not fail");
    String::from_utf8(out).expect("reason: the text format is UTF-8")
}
/// The agent itself: version, node, swarm state, load-balancing backend.
fn agent_info(r: &Registry, snapshot: &Snapshot) {
    gauge(
        r,
        "mesh_agent_info",
        "The agent: its version, node ID, swarm state and load-balancing backend (always 1).",
        &["version", "node", "state", "lb_backend"],
        &[(
            vec![
                crate::VERSION.to_string(),
                snapshot.node.clone().unwrap_or_default(),
                snapshot.state.clone(),
                snapshot.lb_backend.to_string(),
            ],
            1.0,
        )],
    );
}

/// Raft's position (managers).
fn raft(r: &Registry, snapshot: &Snapshot) {
    if let Some(raft) = &snapshot.raft {
        for (name, help, v) in [
            ("mesh_raft_term", "The Raft term this manager is in.", raft.term),
            (
                "mesh_raft_is_leader",
                "1 while this manager leads the swarm's Raft group.",
                u64::from(raft.is_leader),
            ),
            (
                "mesh_raft_last_log_index",
                "The index of this manager's last Raft log entry.",
                raft.last_log_index,
            ),
            (
                "mesh_raft_applied_index",
                "The index of the last Raft entry applied to this manager's store.",
                raft.applied_index,
            ),
            (
                "mesh_raft_snapshot_index",
                "The last Raft index in this manager's latest snapshot.",
                raft.snapshot_index,
            ),
            (
                "mesh_raft_snapshot_bytes",
                "Size of this manager's latest Raft snapshot, in bytes.",
                raft.snapshot_bytes,
            ),
            (
                "mesh_raft_voters",
                "Voting managers in the Raft membership.",
                raft.voters,
            ),
        ] {
            gauge(r, name, help, &[], &[(vec![], v as f64)]);
        }
    }
}

/// The swarm's nodes, services and tasks as this manager's store has them.
fn cluster(r: &Registry, snapshot: &Snapshot) {
    if let Some(cluster) = &snapshot.cluster {
        let nodes: Vec<(Vec<String>, f64)> = tally(cluster.nodes.iter().cloned())
            .into_iter()
            .map(|((role, status, availability), n)| (vec![role, status, availability], n))
            .collect();
        gauge(
            r,
            "mesh_cluster_nodes",
            "Nodes in the swarm, by role, status and availability (as this manager's store has them).",
            &["role", "status", "availability"],
            &nodes,
        );
        gauge(
            r,
            "mesh_cluster_services",
            "Services in the swarm.",
            &[],
            &[(vec![], cluster.services as f64)],
        );
        let tasks: Vec<(Vec<String>, f64)> = tally(cluster.tasks.iter().cloned())
            .into_iter()
            .map(|((state, desired), n)| (vec![state, desired], n))
            .collect();
        gauge(
            r,
            "mesh_cluster_tasks",
            "Tasks in the swarm, by state and desired state.",
            &["state", "desired"],
            &tasks,
        );
    }
}

/// This node's tasks and overlays.
fn node(r: &Registry, snapshot: &Snapshot) {
    let local: Vec<(Vec<String>, f64)> = snapshot
        .local_tasks
        .iter()
        .map(|(state, n)| (vec![state.clone()], *n as f64))
        .collect();
    gauge(
        r,
        "mesh_node_tasks",
        "Tasks assigned to this node, by state.",
        &["state"],
        &local,
    );
    for (name, help, v) in [
        (
            "mesh_overlay_networks",
            "Overlay networks this node has devices for.",
            snapshot.overlay_networks,
        ),
        (
            "mesh_overlay_peers",
            "Other nodes this node's overlay networks reach.",
            snapshot.overlay_peers,
        ),
        (
            "mesh_wireguard_peers",
            "Peers of this node's WireGuard tunnel (encrypted overlays).",
            snapshot.wireguard_peers,
        ),
    ] {
        gauge(r, name, help, &[], &[(vec![], v as f64)]);
    }
}

/// The routing mesh per published port or VIP.
fn mesh_ports(r: &Registry, snapshot: &Snapshot) {
    let port_labels = ["service", "kind", "port", "protocol"];
    let port_rows = |f: fn(&PortFacts) -> u64| -> Vec<(Vec<String>, u64)> {
        snapshot
            .ports
            .iter()
            .map(|p| {
                (
                    vec![
                        p.service.clone(),
                        p.kind.to_string(),
                        p.port.to_string(),
                        p.protocol.to_string(),
                    ],
                    f(p),
                )
            })
            .collect()
    };
    counter(
        r,
        "mesh_lb_packets_total",
        "Packets this node's routing mesh handled for a published port or VIP, both ways.",
        &port_labels,
        &port_rows(|p| p.packets),
    );
    counter(
        r,
        "mesh_lb_bytes_total",
        "Bytes this node's routing mesh handled for a published port or VIP, both ways.",
        &port_labels,
        &port_rows(|p| p.bytes),
    );
    counter(
        r,
        "mesh_lb_connections_total",
        "Connections this node sent to a task of a published port or VIP.",
        &port_labels,
        &port_rows(|p| p.connections),
    );
    let conntrack: Vec<(Vec<String>, f64)> = port_rows(|p| p.conntrack)
        .into_iter()
        .map(|(l, v)| (l, v as f64))
        .collect();
    gauge(
        r,
        "mesh_lb_conntrack_entries",
        "Connections this node's routing mesh tracks now, by published port or VIP.",
        &port_labels,
        &conntrack,
    );
}

/// The routing mesh per local task.
fn mesh_backends(r: &Registry, snapshot: &Snapshot) {
    let backend_rows = |f: fn(&BackendFacts) -> u64| -> Vec<(Vec<String>, u64)> {
        snapshot
            .backends
            .iter()
            .map(|b| (vec![b.service.clone(), b.task.clone()], f(b)))
            .collect()
    };
    counter(
        r,
        "mesh_lb_backend_packets_total",
        "Packets the routing mesh brought to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.packets),
    );
    counter(
        r,
        "mesh_lb_backend_bytes_total",
        "Bytes the routing mesh brought to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.bytes),
    );
    counter(
        r,
        "mesh_lb_backend_connections_total",
        "Connections the routing mesh sent to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.connections),
    );
}

/// The WireGuard tunnel's peers.
fn wireguard(r: &Registry, snapshot: &Snapshot) {
    let peer = |p: &TunnelPeerFacts| vec![p.tunnel.to_string()];
    let ages: Vec<(Vec<String>, f64)> = snapshot
        .wireguard
        .iter()
        .filter_map(|p| Some((peer(p), p.handshake_age_s?)))
        .collect();
    gauge(
        r,
        "mesh_wireguard_peer_handshake_age_seconds",
        "Seconds since the last WireGuard handshake with a peer (by its tunnel address).",
        &["peer"],
        &ages,
    );
    counter(
        r,
        "mesh_wireguard_peer_received_bytes_total",
        "Bytes received from a WireGuard peer (by its tunnel address).",
        &["peer"],
        &snapshot
            .wireguard
            .iter()
            .map(|p| (peer(p), p.rx_bytes))
            .collect::<Vec<_>>(),
    );
    counter(
        r,
        "mesh_wireguard_peer_sent_bytes_total",
        "Bytes sent to a WireGuard peer (by its tunnel address).",
        &["peer"],
        &snapshot
            .wireguard
            .iter()
            .map(|p| (peer(p), p.tx_bytes))
            .collect::<Vec<_>>(),
    );
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str], rows: &[(Vec<String>, f64)]) {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("reason: a valid gauge");
    for (values, v) in rows {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        g.with_label_values(&values).set(*v);
    }
    registry.register(Box::new(g)).expect("reason: names are unique");
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str], rows: &[(Vec<String>, u64)]) {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("reason: a valid counter");
    for (values, v) in rows {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        c.with_label_values(&values).inc_by(*v);
    }
    registry.register(Box::new(c)).expect("reason: names are unique");
}

/// Counts of equal rows.
fn tally<K: Ord + Clone>(rows: impl Iterator<Item = K>) -> std::collections::BTreeMap<K, f64> {
    let mut out = std::collections::BTreeMap::new();
    for r in rows {
        *out.entry(r).or_insert(0.0) += 1.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{
        counted::record_reconcile,
        snapshot::{ClusterFacts, RaftFacts},
    };

    #[test]
    fn a_snapshot_renders_every_family_with_help_and_type() {
        let snapshot = Snapshot {
            node: Some("1a2b".into()),
            state: "active".into(),
            raft: Some(RaftFacts {
                term: 3,
                is_leader: true,
                last_log_index: 40,
                applied_index: 40,
                snapshot_index: 0,
                snapshot_bytes: 0,
                voters: 3,
            }),
            cluster: Some(ClusterFacts {
                nodes: vec![
                    ("manager".into(), "ready".into(), "active".into()),
                    ("manager".into(), "ready".into(), "active".into()),
                    ("worker".into(), "down".into(), "drain".into()),
                ],
                services: 1,
                tasks: vec![("running".into(), "running".into())],
            }),
            local_tasks: vec![("running".into(), 2)],
            lb_backend: "ebpf",
            ports: vec![PortFacts {
                service: "web".into(),
                kind: "published",
                port: 8080,
                protocol: "tcp",
                packets: 10,
                bytes: 1000,
                connections: 2,
                conntrack: 1,
            }],
            backends: vec![BackendFacts {
                service: "web".into(),
                task: "3c".into(),
                packets: 5,
                bytes: 500,
                connections: 1,
            }],
            ..Snapshot::default()
        };
        record_reconcile::<(), ()>("mesh", std::time::Instant::now(), &Err(()));
        let text = render(&snapshot);
        for line in [
            "mesh_raft_is_leader 1",
            "mesh_cluster_nodes{availability=\"active\",role=\"manager\",status=\"ready\"} 2",
            "mesh_lb_packets_total{kind=\"published\",port=\"8080\",protocol=\"tcp\",service=\"web\"} 10",
            "mesh_lb_backend_connections_total{service=\"web\",task=\"3c\"} 1",
            "mesh_kernel_errors_total{mechanism=\"mesh\"}",
            "# TYPE mesh_reconcile_duration_seconds histogram",
            "# HELP mesh_lb_conntrack_entries ",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
