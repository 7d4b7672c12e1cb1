//! mesh-agent: the per-node agent of the mesh.
//!
//! - [`control`]: the swarm: Raft store, PKI, the leader's duties, the messages.
//! - [`node`]: a node's life in the swarm: init, join, leave, unlock, its
//!   session with the managers, and the runtime it drives; the one layer
//!   that uses both `control` and `runtime`.
//! - [`cli`]: the `meshctl` commands.
//! - [`dataplane`]: kernel access, one module per mechanism (netlink, eBPF).
//! - [`runtime`]: what runs on a node: tasks in their namespaces, their
//!   networks, the routing mesh, DNS.
//! - [`locks`]: lock guards that survive a panicked holder.
//! - [`preflight`]: what the node's kernel offers the dataplane.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`config_file`]: `mesh-agent run`'s settings: flags, `MESH_*`, `--config FILE` (TOML).
//!
//! The binaries `mesh-agent` and `meshctl` are thin wrappers over this library.

pub mod api;
pub mod cli;
pub mod config_file;
pub mod control;
pub mod dataplane;
pub mod locks;
pub mod metrics;
pub mod node;
pub mod preflight;
pub mod runtime;

/// The agent's version, as `meshctl version` and `mesh-agent --version` print it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
