//! Prometheus metrics (`mesh-agent run --metrics-addr`, served by
//! [`server`]). Two kinds:
//!
//! - what the agent counts as it goes ([`instruments`], process-wide):
//!   Raft proposal latency and elections, reconcile durations and kernel
//!   errors per mechanism, scheduler decisions;
//! - what it reads at scrape time, as plain data ([`Snapshot`]): Raft's
//!   position, the cluster's nodes, services and tasks (managers), this
//!   node's tasks, overlays and routing-mesh counters (eBPF maps or IPVS
//!   statistics).
//!
//! [`render`] turns both into the text exposition format. Names follow
//! Prometheus' conventions: a `mesh_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters; `promtool check metrics` passes on the
//! output (tests/tests/swarm_metrics.rs).

pub mod server;
pub mod visualizer;

use std::sync::OnceLock;

use prometheus::{
    core::Collector, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

/// The mechanisms a node reconciles (labels of the per-mechanism metrics).
pub const MECHANISMS: [&str; 3] = ["overlay", "tasks", "mesh"];

/// What the agent counts as it goes.
pub struct Instruments {
    registry: Registry,
    /// Seconds from proposing a Raft command to its being applied here.
    pub proposal_seconds: Histogram,
    /// Elections this manager saw (each new term is one).
    pub raft_elections: IntCounter,
    /// Seconds one reconcile of a mechanism took, by mechanism.
    pub reconcile_seconds: HistogramVec,
    /// Failed reconciles, by mechanism (each is a kernel refusal or an
    /// unreachable kernel object).
    pub kernel_errors: IntCounterVec,
    /// Tasks the scheduler placed, or could not place, by outcome.
    pub scheduler_decisions: IntCounterVec,
}

/// The process-wide instruments.
pub fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let registry = Registry::new();
        let latency = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let proposal_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_raft_proposal_duration_seconds",
                "Seconds from proposing a Raft command to its being applied on this manager.",
            )
            .buckets(latency.clone()),
        )
        .expect("reason: a valid histogram");
        let raft_elections = IntCounter::new(
            "mesh_raft_elections_total",
            "Raft elections this manager saw (terms it entered).",
        )
        .expect("reason: a valid counter");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mesh_reconcile_duration_seconds",
                "Seconds one reconcile of this node's kernel state took, by mechanism.",
            )
            .buckets(latency),
            &["mechanism"],
        )
        .expect("reason: a valid histogram");
        let kernel_errors = IntCounterVec::new(
            Opts::new(
                "mesh_kernel_errors_total",
                "Reconciles the kernel refused or that failed, by mechanism.",
            ),
            &["mechanism"],
        )
        .expect("reason: a valid counter");
        let scheduler_decisions = IntCounterVec::new(
            Opts::new(
                "mesh_scheduler_decisions_total",
                "Tasks the scheduler placed on a node or could not place, by outcome.",
            ),
            &["outcome"],
        )
        .expect("reason: a valid counter");
        // Every series exists from the start, at zero (so rates and alerts
        // see the first increase).
        for mechanism in MECHANISMS {
            kernel_errors.with_label_values(&[mechanism]);
            reconcile_seconds.with_label_values(&[mechanism]);
        }
        for outcome in ["placed", "unplaceable"] {
            scheduler_decisions.with_label_values(&[outcome]);
        }
        for c in [
            Box::new(proposal_seconds.clone()) as Box<dyn Collector>,
            Box::new(raft_elections.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(kernel_errors.clone()),
            Box::new(scheduler_decisions.clone()),
        ] {
            registry.register(c).expect("reason: names are unique");
        }
        Instruments {
            registry,
            proposal_seconds,
            raft_elections,
            reconcile_seconds,
            kernel_errors,
            scheduler_decisions,
        }
    })
}

/// An enum's serialized name in lower case, as a label value (`Ready` ->
/// `ready`).
pub fn label<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_lowercase))
        .unwrap_or_default()
}

/// Times one reconcile of `mechanism` and counts it as a kernel error
/// when it failed.
pub fn record_reconcile<T, E>(mechanism: &str, started: std::time::Instant, outcome: &Result<T, E>) {
    let i = instruments();
    i.reconcile_seconds
        .with_label_values(&[mechanism])
        .observe(started.elapsed().as_secs_f64());
    if outcome.is_err() {
        i.kernel_errors.with_label_values(&[mechanism]).inc();
    }
}

/// Raft's position on a manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftFacts {
    pub term: u64,
    pub is_leader: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub snapshot_bytes: u64,
    pub voters: u64,
}

/// The cluster as a manager's store has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// (role, status, availability) of each node.
    pub nodes: Vec<(String, String, String)>,
    pub services: u64,
    /// (state, desired state) of each task.
    pub tasks: Vec<(String, String)>,
}

/// One published port's or VIP's counters on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortFacts {
    /// The service's name (its ID when this node does not know it).
    pub service: String,
    /// `published` or `vip`.
    pub kind: &'static str,
    /// The published port and protocol; 0 and "" for a VIP.
    pub port: u16,
    pub protocol: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub conntrack: u64,
}

/// One local task's counters (what the routing mesh brought it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendFacts {
    pub service: String,
    pub task: String,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// What the agent reads at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The node's ID, when it is in a swarm.
    pub node: Option<String>,
    /// `active`, `locked` or `inactive`.
    pub state: String,
    pub raft: Option<RaftFacts>,
    pub cluster: Option<ClusterFacts>,
    /// This node's tasks by state.
    pub local_tasks: Vec<(String, u64)>,
    pub overlay_networks: u64,
    /// Other nodes this node's overlays reach.
    pub overlay_peers: u64,
    pub wireguard_peers: u64,
    /// `ebpf` or `ipvs`.
    pub lb_backend: &'static str,
    pub ports: Vec<PortFacts>,
    pub backends: Vec<BackendFacts>,
    /// The WireGuard tunnel's peers.
    pub wireguard: Vec<TunnelPeerFacts>,
}

/// One WireGuard peer of the node's tunnel, as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelPeerFacts {
    /// The peer's tunnel address (which node it is).
    pub tunnel: std::net::Ipv6Addr,
    /// Seconds since its last handshake; `None` before the first.
    pub handshake_age_s: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
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

/// The text exposition of `snapshot` and the instruments.
pub fn render(snapshot: &Snapshot) -> String {
    let r = Registry::new();
    gauge(
        &r,
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
            gauge(&r, name, help, &[], &[(vec![], v as f64)]);
        }
    }
    if let Some(cluster) = &snapshot.cluster {
        let nodes: Vec<(Vec<String>, f64)> = tally(cluster.nodes.iter().cloned())
            .into_iter()
            .map(|((role, status, availability), n)| (vec![role, status, availability], n))
            .collect();
        gauge(
            &r,
            "mesh_cluster_nodes",
            "Nodes in the swarm, by role, status and availability (as this manager's store has them).",
            &["role", "status", "availability"],
            &nodes,
        );
        gauge(
            &r,
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
            &r,
            "mesh_cluster_tasks",
            "Tasks in the swarm, by state and desired state.",
            &["state", "desired"],
            &tasks,
        );
    }
    let local: Vec<(Vec<String>, f64)> = snapshot
        .local_tasks
        .iter()
        .map(|(state, n)| (vec![state.clone()], *n as f64))
        .collect();
    gauge(
        &r,
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
        gauge(&r, name, help, &[], &[(vec![], v as f64)]);
    }
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
        &r,
        "mesh_lb_packets_total",
        "Packets this node's routing mesh handled for a published port or VIP, both ways.",
        &port_labels,
        &port_rows(|p| p.packets),
    );
    counter(
        &r,
        "mesh_lb_bytes_total",
        "Bytes this node's routing mesh handled for a published port or VIP, both ways.",
        &port_labels,
        &port_rows(|p| p.bytes),
    );
    counter(
        &r,
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
        &r,
        "mesh_lb_conntrack_entries",
        "Connections this node's routing mesh tracks now, by published port or VIP.",
        &port_labels,
        &conntrack,
    );
    let backend_rows = |f: fn(&BackendFacts) -> u64| -> Vec<(Vec<String>, u64)> {
        snapshot
            .backends
            .iter()
            .map(|b| (vec![b.service.clone(), b.task.clone()], f(b)))
            .collect()
    };
    counter(
        &r,
        "mesh_lb_backend_packets_total",
        "Packets the routing mesh brought to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.packets),
    );
    counter(
        &r,
        "mesh_lb_backend_bytes_total",
        "Bytes the routing mesh brought to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.bytes),
    );
    counter(
        &r,
        "mesh_lb_backend_connections_total",
        "Connections the routing mesh sent to a task on this node.",
        &["service", "task"],
        &backend_rows(|b| b.connections),
    );
    let peer = |p: &TunnelPeerFacts| vec![p.tunnel.to_string()];
    let ages: Vec<(Vec<String>, f64)> = snapshot
        .wireguard
        .iter()
        .filter_map(|p| Some((peer(p), p.handshake_age_s?)))
        .collect();
    gauge(
        &r,
        "mesh_wireguard_peer_handshake_age_seconds",
        "Seconds since the last WireGuard handshake with a peer (by its tunnel address).",
        &["peer"],
        &ages,
    );
    counter(
        &r,
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
        &r,
        "mesh_wireguard_peer_sent_bytes_total",
        "Bytes sent to a WireGuard peer (by its tunnel address).",
        &["peer"],
        &snapshot
            .wireguard
            .iter()
            .map(|p| (peer(p), p.tx_bytes))
            .collect::<Vec<_>>(),
    );
    let mut families = r.gather();
    families.extend(instruments().registry.gather());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("reason: encoding into memory does not fail");
    String::from_utf8(out).expect("reason: the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

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
