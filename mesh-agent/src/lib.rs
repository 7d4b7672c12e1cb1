//! mesh-agent: the per-node agent of the mesh.
//!
//! The layers, from the bottom (`cargo xtask layers` checks them):
//!
//! - [`api`]: the swarm's plain data (objects, messages, assignments) and
//!   pure helpers; with [`ca`] and [`wire`], it is the mesh-api crate
//!   (shared with `meshctl`), re-exported here.
//! - [`dataplane`]: kernel access, one module per mechanism (netlink, eBPF,
//!   nftables, IPVS, XFRM, WireGuard). [`metrics`]: the Prometheus
//!   instruments, their rendering and the HTTP endpoints.
//! - [`ca`]: keys and certificates; [`wire`]: mutual-TLS RPC between nodes
//!   and the local socket `meshctl` uses.
//! - [`manager`]: the leader's side: Raft and the store, the cluster API,
//!   scheduler, orchestrator, allocator and dispatcher.
//! - [`agent`]: what runs on a node: tasks in their namespaces, their
//!   networks, the routing mesh, DNS.
//! - [`node`]: a node's life in the swarm: init, join, leave, unlock, its
//!   session with the managers; the one layer over both `manager` and `agent`.
//! - [`locks`]: lock guards that survive a panicked holder; [`preflight`]:
//!   what the node's kernel offers the dataplane; [`config_file`]:
//!   `mesh-agent run`'s settings: flags, `MESH_*`, `--config FILE` (TOML).
//!
//! The `mesh-agent` binary (mesh-agent-bin) is a thin wrapper over this library;
//! `meshctl` is a crate of its own over mesh-api.

pub use mesh_api::{api, ca, invalid, refusal, wire};

pub mod agent;
pub mod config_file;
pub mod dataplane;
pub(crate) mod locks;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod preflight;

/// The agent's version, as `meshctl version` and `mesh-agent --version` print it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
