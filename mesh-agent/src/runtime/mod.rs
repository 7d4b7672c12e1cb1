//! Task runtime: the namespaces tasks run in, the processes, and the
//! node's side of service scheduling.
//!
//! - [`netns`]: named network namespaces (bind mounts).
//! - [`process`]: forking a task into its namespaces; signals (the kernel layer).
//! - [`network`]: the node-local bridge network tasks attach to.
//! - [`overlay`]: this node's overlay networks (VXLAN) and its tasks' ports on them.
//! - [`plan`]: assignments vs what runs here (pure).
//! - [`health`]: health verdicts from check results (pure).
//! - [`logs`]: reading task logs.
//! - [`supervisor`]: runs, watches, stops and reports this node's tasks.

pub mod bpffs;
pub mod cgroup;
pub mod dns;
pub mod files;
pub mod health;
pub mod ipsec;
pub mod logs;
pub mod mesh;
pub mod mesh_ipvs;
pub mod mesh_tables;
pub mod netns;
pub mod network;
pub mod overlay;
pub mod plan;
pub mod process;
pub mod supervisor;
pub mod tunnel;
