//! The cgroups the node's tasks run in.
//!
//! Every agent has a cgroup v2 of its own (`mesh-<hash of its data
//! directory>`, so several agents on one host keep apart), where the VIP
//! socket programs (mesh-ebpf's `sock` module) are attached: they act on
//! its tasks' sockets and nobody else's. Each task gets a leaf below it
//! (`task-<id>`), and its limits go to the memory, cpu and pids
//! controllers wherever this host has them: in cgroup v2 when the unified
//! hierarchy holds them (current distributions), else in the cgroup v1
//! hierarchies of a hybrid host (cgroup v2 holding only some controllers),
//! under the agent's own cgroup there. [`Layout`] says which, and `mesh-agent
//! check` reports it.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use super::error::TaskError;
use crate::api::resources::{Resources, NANOS_PER_CPU};

/// The controllers task limits use.
pub(crate) const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The CFS period a CPU limit is expressed in (Docker's: 100 ms).
const CPU_PERIOD_US: u64 = 100_000;

/// Where the cgroup v2 hierarchy is mounted, from `mountinfo` text: the
/// mount point of the first `cgroup2` file system.
pub(crate) fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Where each controller task limits use lives on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The cgroup v2 mount point, if any.
    pub(crate) v2_root: Option<PathBuf>,
    /// Per controller: its directory for this process's cgroups to go
    /// under, and whether it is the v2 hierarchy's.
    pub(crate) controllers: BTreeMap<&'static str, Placement>,
}

/// Where one controller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// In the cgroup v2 hierarchy.
    V2,
    /// In a cgroup v1 hierarchy: the directory of this process's cgroup there.
    V1(PathBuf),
}

impl Layout {
    /// Reads it from `mountinfo` and `/proc/self/cgroup` text and the v2
    /// root's `cgroup.controllers` (pure).
    pub(crate) fn parse(mountinfo: &str, self_cgroup: &str, v2_controllers: &str) -> Layout {
        let v2_root = cgroup2_root(mountinfo);
        let in_v2: Vec<&str> = v2_controllers.split_whitespace().collect();
        let mut controllers = BTreeMap::new();
        for controller in CONTROLLERS {
            if v2_root.is_some() && in_v2.contains(&controller) {
                controllers.insert(controller, Placement::V2);
                continue;
            }
            let mount = mountinfo.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut fs = right.split_whitespace();
                let options = (fs.next()? == "cgroup").then(|| fs.nth(1))??;
                options
                    .split(',')
                    .any(|o| o == controller)
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            });
            let own = self_cgroup.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                names
                    .split(',')
                    .any(|n| n == controller)
                    .then(|| path.trim_start_matches('/').to_string())
            });
            if let (Some(mount), Some(own)) = (mount, own) {
                controllers.insert(controller, Placement::V1(mount.join(own)));
            }
        }
        Layout { v2_root, controllers }
    }

    /// This host's.
    pub(crate) fn read() -> Layout {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v2 = cgroup2_root(&mountinfo)
            .and_then(|root| std::fs::read_to_string(root.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        Layout::parse(&mountinfo, &own, &v2)
    }

    /// One line per controller, for `mesh-agent check`.
    pub(crate) fn describe(&self) -> Vec<String> {
        CONTROLLERS
            .iter()
            .map(|c| match self.controllers.get(c) {
                Some(Placement::V2) => format!("{c}: cgroup v2"),
                Some(Placement::V1(dir)) => format!("{c}: cgroup v1 ({})", dir.display()),
                None => format!("{c}: missing (no task limit of this kind can be kept)"),
            })
            .collect()
    }
}

/// The agent's cgroups for its tasks.
#[derive(Clone, Debug)]
pub struct TaskCgroup {
    /// Its cgroup v2 (what the socket programs attach to).
    dir: PathBuf,
    /// Its directory in each v1 hierarchy a controller is taken from.
    v1: BTreeMap<&'static str, PathBuf>,
    /// The controllers limits are written to in v2.
    v2_controllers: Vec<&'static str>,
}

impl TaskCgroup {
    /// Makes (or finds) the cgroups of the agent with data directory `data_dir`.
    pub(crate) fn create(data_dir: &Path) -> Result<TaskCgroup, TaskError> {
        let layout = Layout::read();
        let root = layout.v2_root.clone().ok_or(TaskError::NoCgroup2)?;
        let mut h = std::hash::DefaultHasher::new();
        data_dir.hash(&mut h);
        let name = format!("mesh-{:016x}", h.finish());
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).map_err(TaskError::io(format!("creating {}", dir.display())))?;
        let mut v1 = BTreeMap::new();
        let mut v2_controllers = Vec::new();
        for (controller, placement) in &layout.controllers {
            match placement {
                Placement::V2 => {
                    // Handed down to the tasks' leaves (a cgroup with
                    // processes of its own could not; this one has none).
                    let enable = format!("+{controller}");
                    let _ = std::fs::write(root.join("cgroup.subtree_control"), &enable);
                    if std::fs::write(dir.join("cgroup.subtree_control"), &enable).is_ok() {
                        v2_controllers.push(*controller);
                    }
                }
                Placement::V1(own) => {
                    let base = own.join(&name);
                    if std::fs::create_dir_all(&base).is_ok() {
                        v1.insert(*controller, base);
                    }
                }
            }
        }
        // Recorded, so whoever cleans up after the agent can find them.
        let mut record = dir.display().to_string();
        for base in v1.values() {
            record.push('\n');
            record.push_str(&base.display().to_string());
        }
        let _ = std::fs::write(data_dir.join("cgroup"), record);
        Ok(TaskCgroup {
            dir,
            v1,
            v2_controllers,
        })
    }

    /// Kills whatever is still in the cgroups recorded in `data_dir` and
    /// removes them (the node left the swarm, or its agent is gone for
    /// good: no task of it may outlive that, even one whose PID was not
    /// written down yet). Tries for up to a second: killed tasks take a
    /// moment to leave.
    pub fn remove_recorded(data_dir: &Path) {
        let Ok(record) = std::fs::read_to_string(data_dir.join("cgroup")) else {
            return;
        };
        let dirs: Vec<PathBuf> = record.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect();
        // cgroup.kill (kernel >= 5.14) kills every process below at once.
        if let Some(v2) = dirs.first() {
            let _ = std::fs::write(v2.join("cgroup.kill"), "1");
        }
        for dir in &dirs {
            remove_tree(dir);
        }
    }

    /// Its v2 directory (what programs attach to).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes task `task`'s leaves with `resources`' limits (refused when a
    /// limit needs a controller this host lacks).
    pub(crate) fn leaf(&self, task: &str, resources: &Resources) -> Result<TaskLeaf, TaskError> {
        let name = format!("task-{task}");
        // A v1 hierarchy only for a limit set there: joining a cgroup costs
        // the task's start an RCU grace period per hierarchy.
        let limited = |controller: &str| match controller {
            "memory" => resources.memory_limit.is_some(),
            "cpu" => resources.cpu_limit.is_some(),
            _ => resources.pids_limit.is_some(),
        };
        let mut dirs = vec![self.dir.join(&name)];
        dirs.extend(
            self.v1
                .iter()
                .filter(|(controller, _)| limited(controller))
                .map(|(_, base)| base.join(&name)),
        );
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(TaskError::io(format!("creating {}", dir.display())))?;
        }
        let leaf = self.existing_leaf(task);
        let wanted = [
            ("memory", resources.memory_limit.map(|m| (m.to_string(), m.to_string()))),
            (
                "cpu",
                resources.cpu_limit.map(|n| {
                    let quota = (n * CPU_PERIOD_US / NANOS_PER_CPU).max(1000);
                    (format!("{quota} {CPU_PERIOD_US}"), quota.to_string())
                }),
            ),
            ("pids", resources.pids_limit.map(|p| (p.to_string(), p.to_string()))),
        ];
        for (controller, value) in wanted {
            let Some((v2_value, v1_value)) = value else { continue };
            let (file, value) = match (self.v2_controllers.contains(&controller), self.v1.get(controller)) {
                (true, _) => (leaf.v2.join(v2_file(controller)), v2_value),
                (false, Some(base)) => {
                    if controller == "cpu" {
                        let period = base.join(&name).join("cpu.cfs_period_us");
                        std::fs::write(&period, CPU_PERIOD_US.to_string())
                            .map_err(TaskError::io(format!("writing {}", period.display())))?;
                    }
                    (base.join(&name).join(v1_file(controller)), v1_value)
                }
                (false, None) => {
                    leaf.remove();
                    return Err(TaskError::NoController(controller));
                }
            };
            std::fs::write(&file, &value).map_err(TaskError::io(format!("writing {value} to {}", file.display())))?;
        }
        Ok(leaf)
    }

    /// Task `task`'s leaves, where [`TaskCgroup::leaf`] makes them (an
    /// adopted task's; a v1 one exists only for a limit set there).
    pub(crate) fn existing_leaf(&self, task: &str) -> TaskLeaf {
        let name = format!("task-{task}");
        TaskLeaf {
            v2: self.dir.join(&name),
            v1: self.v1.iter().map(|(c, base)| (*c, base.join(&name))).collect(),
            memory_in_v2: self.v2_controllers.contains(&"memory"),
        }
    }
}

fn v2_file(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory.max",
        "cpu" => "cpu.max",
        _ => "pids.max",
    }
}

fn v1_file(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory.limit_in_bytes",
        "cpu" => "cpu.cfs_quota_us",
        _ => "pids.max",
    }
}

/// Removes `dir` and every cgroup below it, deepest first, retrying for
/// up to a second while their processes leave.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..20 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::thread::sleep(Duration::from_millis(50)),
            _ => return,
        }
    }
}

/// One task's cgroups.
#[derive(Clone, Debug)]
pub(crate) struct TaskLeaf {
    v2: PathBuf,
    v1: BTreeMap<&'static str, PathBuf>,
    memory_in_v2: bool,
}

impl TaskLeaf {
    /// The `cgroup.procs` files a task's first process writes itself to.
    pub(crate) fn procs(&self) -> Vec<PathBuf> {
        std::iter::once(&self.v2)
            .chain(self.v1.values().filter(|d| d.exists()))
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// How many times the kernel's OOM killer killed in it.
    pub(crate) fn oom_kills(&self) -> u64 {
        let (file, key) = match (self.memory_in_v2, self.v1.get("memory")) {
            (true, _) => (self.v2.join("memory.events"), "oom_kill"),
            (false, Some(dir)) => (dir.join("memory.oom_control"), "oom_kill"),
            (false, None) => return 0,
        };
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Removes it (once its processes are gone).
    pub(crate) fn remove(&self) {
        for dir in std::iter::once(&self.v2).chain(self.v1.values()) {
            remove_tree(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,nosuid shared:13 - cgroup cgroup rw,pids";

    #[test]
    fn the_cgroup2_mount_is_found_in_a_hybrid_layout() {
        assert_eq!(cgroup2_root(HYBRID), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_root("32 30 0:28 / /x rw - cgroup cgroup rw,cpu"), None);
    }

    #[test]
    fn a_hybrid_host_takes_limits_from_v1_under_the_agents_own_cgroups() {
        let own = "8:pids:/\n4:memory:/outer/box\n1:cpu:/\n0::/";
        let layout = Layout::parse(HYBRID, own, "hugetlb");
        assert_eq!(
            layout.controllers.get("memory"),
            Some(&Placement::V1(PathBuf::from("/sys/fs/cgroup/memory/outer/box")))
        );
        assert_eq!(
            layout.controllers.get("cpu"),
            Some(&Placement::V1(PathBuf::from("/sys/fs/cgroup/cpu")))
        );
        assert!(layout.describe()[0].contains("cgroup v1"), "{:?}", layout.describe());
    }

    #[test]
    fn a_v2_host_takes_limits_from_v2_and_says_what_is_missing() {
        let mountinfo = "31 30 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        let layout = Layout::parse(mountinfo, "0::/system.slice/mesh.service", "cpuset cpu io memory");
        assert_eq!(layout.controllers.get("memory"), Some(&Placement::V2));
        assert_eq!(layout.controllers.get("cpu"), Some(&Placement::V2));
        assert_eq!(layout.controllers.get("pids"), None);
        assert!(
            layout.describe()[2].contains("pids: missing"),
            "{:?}",
            layout.describe()
        );
    }
}
