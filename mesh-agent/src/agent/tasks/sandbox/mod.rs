//! A task's sandbox, made the way a container runtime makes one.
//!
//! The agent starts every task through `mesh-agent task-init` (its own
//! binary, exec'd: a fresh process that holds no copy of the agent's memory
//! or keys), and hands it an [`InitSpec`] over a socket on its stdin. The
//! init, still root, then:
//!
//! 1. joins the task's cgroups, starts a session, enters the task's network
//!    namespace and makes new UTS, IPC, mount and PID namespaces;
//! 2. builds the task's view of the file system ([`mounts`]): resolv.conf,
//!    secrets and configs, the node's data directory and the agent's socket
//!    hidden, device nodes unusable but for a private /dev, /sys read-only,
//!    and with `--read-only` everything read-only;
//! 3. forks the namespace's PID 1, which mounts the task's own /proc and
//!    reaps, and forks the task's process from it (so a task without signal
//!    handlers still stops on SIGTERM, as with `docker run --init`);
//! 4. there drops to Docker's default capabilities (with `--cap-add` and
//!    `--cap-drop`), sets `no_new_privs`, loads the default seccomp filter
//!    ([`seccomp`]) unless `seccomp=unconfined`, becomes `--user`, and execs.
//!
//! The first process stays in the node's PID namespace as the one the
//! agent watches: it ends as the task ends, with its exit status (a task
//! killed by signal N ends it by signal N). The socket reports whether the
//! task started: it closes on the task's exec, or carries the reason it
//! could not.
//!
//! Health checks run through the same init ([`ExecSpec`]): inside the
//! task's namespaces, confined as the task is.

mod init;
pub(crate) mod mounts;
pub mod seccomp;

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use init::init_main;

/// The argument that makes the agent's binary a task init.
pub const INIT_ARG: &str = "task-init";

/// How a task is confined (a service's [`crate::api::security::Security`],
/// resolved).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    /// Capabilities (bit N: capability N) when it runs as root.
    pub caps: u64,
    /// The seccomp filters to load, compiled by the agent (none:
    /// unconfined), each instruction packed by [`seccomp::pack`].
    pub seccomp: Vec<Vec<u64>>,
    /// Run as (uid, gid), with that group alone; root if unset.
    pub user: Option<(u32, u32)>,
}

/// What `task-init` starts.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct InitSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: String,
    /// The UTS namespace's hostname.
    pub hostname: String,
    /// The task's network namespace (a bind-mounted namespace file).
    pub netns: PathBuf,
    /// The `cgroup.procs` files of the cgroups the task joins.
    pub cgroup_procs: Vec<PathBuf>,
    /// Mounted over /etc/resolv.conf.
    pub resolv_conf: Option<PathBuf>,
    /// Read-only bind mounts (source, where the task sees it).
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// What of the node is hidden from the task (the agent's data
    /// directory and socket).
    pub masked: Vec<PathBuf>,
    /// `--read-only`.
    pub read_only: bool,
    /// `--mount`s, volumes resolved to their directory (binds and tmpfs only).
    pub mounts: Vec<crate::api::mounts::Mount>,
    /// Capabilities, seccomp, user.
    pub confinement: Confinement,
}

/// What `task-init` runs inside a running task (a health check).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ExecSpec {
    /// The task's first process (the one the agent watches).
    pub task_pid: u32,
    /// Program and arguments.
    pub command: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Capabilities, seccomp, user: the task's.
    pub confinement: Confinement,
}

/// What the agent sends `task-init`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub enum InitRequest {
    /// Start a task.
    Start(InitSpec),
    /// Run a command in a running task.
    Exec(ExecSpec),
}

/// The prefix of a report that the task's program could not be executed,
/// followed by the errno.
pub(crate) const EXEC_FAILED: &str = "exec:";
