//! mesh-agent: the per-node agent of the mesh.
//!
//! - [`dataplane`]: kernel access, one module per mechanism (netlink, eBPF).
//! - [`runtime`]: network namespaces for tasks.
//!
//! The binaries `mesh-agent` and `meshctl` are thin wrappers over this library.

pub mod dataplane;
pub mod runtime;

/// The agent's version, as `meshctl version` and `mesh-agent --version` print it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
