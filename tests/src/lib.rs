//! Test support for mesh: a cluster of hosts in network namespaces
//! ([`cluster`]), processes inside them ([`process`]), BPF_PROG_TEST_RUN
//! ([`test_run`]) and packet fixtures ([`packet`]).
//!
//! Everything a test creates lives in namespaces the test made; nothing is
//! added to the root namespace, and everything is removed on drop, on panic,
//! and (for a run that crashed) by the next cluster created on the machine.

pub mod chaos;
pub mod cluster;
pub mod mesh;
pub mod overlay;
pub mod packet;
pub mod process;
pub mod sim;
pub mod swarm;
pub mod test_run;

pub use cluster::{Cluster, Host};
pub use process::Process;

/// Fails the calling test unless it runs as root, saying why: the kernel
/// lane creates namespaces and loads eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the kernel lane needs root (network namespaces, eBPF): run it through `sudo cargo xtask test`"
    );
}
