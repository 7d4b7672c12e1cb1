//! mesh-agent: the per-node agent of the mesh.
//!
//! - [`control`]: the swarm: Raft store, PKI, join, node management.
//! - [`cli`]: the `meshctl` commands.
//! - [`dataplane`]: kernel access, one module per mechanism (netlink, eBPF).
//! - [`runtime`]: network namespaces for tasks.
//! - [`preflight`]: what the node's kernel offers the dataplane.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`config_file`]: `mesh-agent run`'s settings: flags, `MESH_*`, `--config FILE` (TOML).
//!
//! The binaries `mesh-agent` and `meshctl` are thin wrappers over this library.

pub mod cli;
pub mod config_file;
pub mod control;
pub mod dataplane;
pub mod locks;
pub mod metrics;
pub mod preflight;
pub mod runtime;
pub mod subnet;

/// The agent's version, as `meshctl version` and `mesh-agent --version` print it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
