//! Why a task could not be prepared, started or adopted on this node: the
//! text is what the task's status shows (`meshctl service ps`).

use std::io;

use crate::agent::net::{bridge::NetworkError, error::NetError, netns::NetnsError};

/// A task's failure before it ran (or when taken over after a restart).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    /// `--user` is not USER, UID, USER:GROUP or UID:GID.
    #[error("invalid --user {spec:?}: expected USER, UID, USER:GROUP or UID:GID")]
    UserSyntax {
        /// What the service asked for.
        spec: String,
    },
    /// `--user` names a user or group this node does not have.
    #[error("--user {spec:?}: no {what} {name:?} in {file} on this node")]
    UnknownUser {
        /// What the service asked for.
        spec: String,
        /// "user" or "group".
        what: &'static str,
        /// The name not found.
        name: String,
        /// The file looked in.
        file: &'static str,
    },
    /// A config's absolute target is not a file on this node.
    #[error("config target {target} is not a file on this node: tasks share the node's file system, so a config goes under {dir} or over a file that exists")]
    ConfigTarget {
        /// The target asked for.
        target: String,
        /// Where configs go instead.
        dir: &'static str,
    },
    /// A file-system step failed.
    #[error("{doing}: {source}")]
    Io {
        /// What was being done.
        doing: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The task's network namespace could not be made.
    #[error("creating the task's network namespace: {0}")]
    Netns(#[from] NetnsError),
    /// The node bridge refused the task.
    #[error("{doing}: {source}")]
    Bridge {
        /// What was being done.
        doing: &'static str,
        /// Why it failed.
        source: NetworkError,
    },
    /// An overlay or the task's DNS could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The task's program could not be started.
    #[error("starting {program:?}: {}", spawn_reason(source))]
    Spawn {
        /// The program (the command's first word).
        program: String,
        /// Why `exec` failed.
        source: io::Error,
    },
    /// The task was gone before the agent could watch it.
    #[error("the task exited before it could be watched")]
    Vanished,
    /// A previous agent's task could not be taken over.
    #[error("the task's process could not be adopted after an agent restart: {0}")]
    Adopt(#[source] io::Error),
    /// A `--mount` cannot be made on this node.
    #[error("--mount {mount}: {reason}")]
    Mount {
        /// The mount, as given.
        mount: String,
        /// What is wrong on this node.
        reason: String,
    },
    /// A previous agent started the task without a sandbox.
    #[error("the task was started without a sandbox by an earlier agent version: replaced by a sandboxed one")]
    Unsandboxed,
    /// A limit needs a cgroup controller this host lacks.
    #[error("this node has no {0} cgroup controller for the service's limit (see `mesh-agent check`)")]
    NoController(&'static str),
    /// Limits were asked for on a node whose tasks get no cgroup.
    #[error(
        "this node runs its tasks without cgroups (no cgroup v2 is mounted), so it cannot keep the service's limits"
    )]
    NoCgroups,
    /// No cgroup v2 hierarchy is mounted on this host.
    #[error("no cgroup v2 hierarchy is mounted")]
    NoCgroup2,
}

impl TaskError {
    /// A failed file-system step, with what it was.
    pub(crate) fn io(doing: impl Into<String>) -> impl FnOnce(io::Error) -> TaskError {
        let doing = doing.into();
        move |source| TaskError::Io { doing, source }
    }
}

/// `exec`'s failure in the words an operator expects.
fn spawn_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "executable file not found (in $PATH or at that path)".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}
