//! A node's tasks.
//!
//! - [`plan`]: assignments vs what runs here (pure).
//! - [`supervisor`]: runs, watches, stops and reports this node's tasks.
//! - [`process`]: starting a task and signalling it; [`sandbox`]: the
//!   namespaces, file-system view, capabilities and seccomp filter it runs in.
//! - [`files`]: secrets and configs as files in a task's namespace.
//! - [`health`]: health verdicts from check results (pure).
//! - [`cgroup`]: the cgroup tasks run in; [`logs`]: reading task logs.
//! - [`error`]: why a task could not be started or adopted.

pub mod cgroup;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod health;
pub(crate) mod logs;
pub(crate) mod plan;
pub mod process;
pub mod sandbox;
pub mod supervisor;
