//! Prometheus metrics (`mesh-agent run --metrics-addr`, served by
//! [`server`]). Two kinds:
//!
//! - what the agent counts as it goes ([`counted`], process-wide):
//!   Raft proposal latency and elections, reconcile durations and kernel
//!   errors per mechanism, scheduler decisions;
//! - what it reads at scrape time, as plain data ([`snapshot`]): Raft's
//!   position, the cluster's nodes, services and tasks (managers), this
//!   node's tasks, overlays and routing-mesh counters (eBPF maps or IPVS
//!   statistics).
//!
//! [`render()`] turns both into the text exposition format, one function per
//! family. Names follow Prometheus' conventions: a `mesh_` prefix, base
//! units (`_seconds`, `_bytes`), `_total` on counters; `promtool check
//! metrics` passes on the output (tests/tests/swarm_metrics.rs).

pub(crate) mod counted;
pub(crate) mod render;
pub mod server;
pub(crate) mod snapshot;
pub mod visualizer;

pub(crate) use counted::{instruments, label, record_reconcile};
pub(crate) use render::render;
pub(crate) use snapshot::{BackendFacts, ClusterFacts, PortFacts, RaftFacts, Snapshot, TunnelPeerFacts};
