//! The cgroup (v2) the node's tasks run in, so the VIP socket programs
//! (mesh-ebpf's `sock` module) act on the tasks' sockets and nobody
//! else's. One per agent, named after its data directory, so several
//! agents on one host (the test harness) keep apart.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use super::error::TaskError;

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

/// The tasks' cgroup.
#[derive(Clone, Debug)]
pub struct TaskCgroup {
    dir: PathBuf,
}

impl TaskCgroup {
    /// Makes (or finds) the cgroup of the agent with data directory `data_dir`.
    pub(crate) fn create(data_dir: &Path) -> Result<TaskCgroup, TaskError> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(TaskError::io("reading /proc/self/mountinfo"))?;
        let root = cgroup2_root(&mountinfo).ok_or(TaskError::NoCgroup2)?;
        let mut h = std::hash::DefaultHasher::new();
        data_dir.hash(&mut h);
        let dir = root.join(format!("mesh-{:016x}", h.finish()));
        std::fs::create_dir_all(&dir).map_err(TaskError::io(format!("creating {}", dir.display())))?;
        // Recorded, so whoever cleans up after the agent can find it.
        let _ = std::fs::write(data_dir.join("cgroup"), dir.as_os_str().as_encoded_bytes());
        Ok(TaskCgroup { dir })
    }

    /// Kills whatever is still in the cgroup recorded in `data_dir` and
    /// removes it (the node left the swarm, or its agent is gone for good:
    /// no task of it may outlive that, even one whose PID was not written
    /// down yet). Tries for up to a second: killed tasks take a moment to
    /// leave.
    pub fn remove_recorded(data_dir: &Path) {
        let Ok(path) = std::fs::read_to_string(data_dir.join("cgroup")) else {
            return;
        };
        // cgroup.kill (kernel >= 5.14) kills every process in it at once.
        let _ = std::fs::write(Path::new(&path).join("cgroup.kill"), "1");
        for _ in 0..20 {
            match std::fs::remove_dir(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => return,
            }
        }
    }

    /// Its directory (what programs attach to).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a process writes its PID to, to join.
    pub(crate) fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_a_hybrid_layout() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_root(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_root("32 30 0:28 / /x rw - cgroup cgroup rw,cpu"), None);
    }
}
