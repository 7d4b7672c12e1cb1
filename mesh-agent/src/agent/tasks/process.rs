//! Starting and signalling task processes.
//!
//! A task runs in its own session (so it outlives an agent restart and is
//! signalled as a group), in its sandbox ([`super::sandbox`]), which
//! `mesh-agent task-init` makes in a process of its own: no agent thread
//! ever changes namespace.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Stdio,
};

use super::{
    error::TaskError,
    sandbox::{seccomp, Confinement, ExecSpec, InitRequest, InitSpec, EXEC_FAILED, INIT_ARG},
};
use crate::api::security::{Seccomp, Security};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Who a task runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User ID.
    pub(crate) uid: u32,
    /// Primary group ID.
    pub(crate) gid: u32,
    /// Home directory (for `HOME`).
    pub(crate) home: String,
}

/// Resolves `--user` (`name`, `uid`, `name:group` or `uid:gid`) against the
/// texts of /etc/passwd and /etc/group. Pure, so it is tested without root
/// and never calls the libc resolver from the agent's threads.
pub(crate) fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<User, TaskError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(TaskError::UserSyntax { spec: spec.into() });
    }
    let entries = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6).then(|| (f[0], f[2].parse::<u32>().ok(), f[3].parse::<u32>().ok(), f[5]))
    });
    let mut found = None;
    for (name, uid, gid, home) in entries {
        if name == user_part || uid.map(|u| u.to_string()).as_deref() == Some(user_part) {
            if let (Some(uid), Some(gid)) = (uid, gid) {
                found = Some(User {
                    uid,
                    gid,
                    home: home.to_string(),
                });
                break;
            }
        }
    }
    let mut user = match (found, user_part.parse::<u32>()) {
        (Some(u), _) => u,
        // A numeric UID need not have a passwd entry (as in Docker).
        (None, Ok(uid)) => User {
            uid,
            gid: uid,
            home: "/".into(),
        },
        (None, Err(_)) => {
            return Err(TaskError::UnknownUser {
                spec: spec.into(),
                what: "user",
                name: user_part.into(),
                file: "/etc/passwd",
            })
        }
    };
    if let Some(g) = group_part {
        user.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g).then(|| f[2].parse::<u32>().ok()).flatten()
                })
                .ok_or_else(|| TaskError::UnknownUser {
                    spec: spec.into(),
                    what: "group",
                    name: g.into(),
                    file: "/etc/group",
                })?,
        };
    }
    Ok(user)
}

/// The environment a task starts with: a fixed base (there is no image to
/// take one from), then the service's `--env`, which may override it.
pub(crate) fn environment(
    service_env: &BTreeMap<String, String>,
    hostname: &str,
    task_name: &str,
    home: &str,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("HOSTNAME", hostname),
        ("HOME", home),
        ("MESH_TASK_NAME", task_name),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(service_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// What to start.
pub struct Launch<'a> {
    /// The agent's binary, run as the task's init (`mesh-agent task-init`).
    pub init: &'a Path,
    /// Program and arguments.
    pub command: &'a [String],
    /// The whole environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory (default `/`).
    pub workdir: Option<&'a str>,
    /// The UTS namespace's hostname.
    pub hostname: &'a str,
    /// The task's network namespace (its bind-mounted file).
    pub netns: &'a Path,
    /// Where stdout and stderr go (opened for appending).
    pub log: &'a File,
    /// Mounted over /etc/resolv.conf in the task's mount namespace.
    pub resolv_conf: Option<&'a Path>,
    /// The `cgroup.procs` files of the cgroups the task joins.
    pub cgroup_procs: &'a [PathBuf],
    /// Directories and files bind-mounted read-only in the task's mount
    /// namespace (source, where the task sees it): its secrets and configs.
    pub binds: &'a [(PathBuf, PathBuf)],
    /// What of the node the task must not see (data directory, socket).
    pub masked: &'a [PathBuf],
    /// Its capabilities, seccomp filters and user ([`confinement`]).
    pub confinement: &'a Confinement,
    /// `--read-only`.
    pub read_only: bool,
    /// Its `--mount`s, volumes resolved to their directories.
    pub mounts: &'a [crate::api::mounts::Mount],
}

/// The confinement of a task of `security` running as `user`.
pub fn confinement(security: &Security, user: Option<&User>) -> io::Result<Confinement> {
    let caps = security
        .capabilities()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let seccomp = match security.seccomp {
        Seccomp::Default => seccomp::packed_filters(caps).map_err(io::Error::other)?,
        Seccomp::Unconfined => vec![],
    };
    Ok(Confinement {
        caps: caps.0,
        seccomp,
        user: user.map(|u| (u.uid, u.gid)),
    })
}

/// Starts a task in its sandbox (see [`super::sandbox`]). The child is
/// the task's first process, its own session leader (so its PID is also
/// its process group's ID); it ends as the task ends. Returns once the
/// task's program runs, or with why it could not.
pub async fn spawn(launch: &Launch<'_>) -> io::Result<tokio::process::Child> {
    if launch.command.first().is_none_or(|p| p.is_empty()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the task has no command"));
    }
    let request = InitRequest::Start(InitSpec {
        command: launch.command.to_vec(),
        env: launch.env.clone(),
        workdir: launch.workdir.unwrap_or("/").to_string(),
        hostname: launch.hostname.to_string(),
        netns: launch.netns.to_path_buf(),
        cgroup_procs: launch.cgroup_procs.to_vec(),
        resolv_conf: launch.resolv_conf.map(Path::to_path_buf),
        binds: launch.binds.to_vec(),
        masked: launch.masked.to_vec(),
        read_only: launch.read_only,
        mounts: launch.mounts.to_vec(),
        confinement: launch.confinement.clone(),
    });
    let log = || launch.log.try_clone().map(Stdio::from);
    start_init(launch.init, &request, log()?, log()?, false).await
}

/// Runs `mesh-agent task-init` with `request`; returns once it reports
/// that the program runs (its socket closes) or why not.
async fn start_init(
    init: &Path,
    request: &InitRequest,
    stdout: Stdio,
    stderr: Stdio,
    kill_on_drop: bool,
) -> io::Result<tokio::process::Child> {
    let bytes = rmp_serde::to_vec(request).map_err(io::Error::other)?;
    let (ours, theirs) = UnixStream::pair()?;
    let mut cmd = tokio::process::Command::new(init);
    cmd.arg(INIT_ARG)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(kill_on_drop);
    let mut child = cmd.spawn()?;
    // The command holds the init's end of the socket until dropped.
    drop(cmd);
    ours.set_nonblocking(true)?;
    let mut ours = tokio::net::UnixStream::from_std(ours)?;
    ours.write_all(&bytes).await?;
    ours.shutdown().await?;
    let mut verdict = String::new();
    ours.read_to_string(&mut verdict).await?;
    if verdict.is_empty() {
        return Ok(child);
    }
    let _ = child.wait().await;
    Err(match verdict.strip_prefix(EXEC_FAILED).and_then(|e| e.parse().ok()) {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(verdict),
    })
}

/// Starts `sh -c COMMAND` inside a running task (its namespaces, confined
/// as it is), with the task's environment; stdout and stderr are piped to
/// the caller, and the command goes when the returned child is dropped.
/// This is how health checks run.
pub(crate) async fn spawn_in_task(
    init: &Path,
    task_pid: u32,
    command: &str,
    env: &BTreeMap<String, String>,
    confinement: Confinement,
) -> io::Result<tokio::process::Child> {
    let request = InitRequest::Exec(ExecSpec {
        task_pid,
        command: vec!["/bin/sh".into(), "-c".into(), command.into()],
        env: env.clone(),
        confinement,
    });
    start_init(init, &request, Stdio::piped(), Stdio::piped(), true).await
}

/// Sends `signal` to the process group led by `pid` (the task and anything
/// it started); a group that is already gone is not an error.
pub(crate) fn signal_group(pid: u32, signal: i32) -> io::Result<()> {
    let pgid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory preconditions.
    match check(unsafe { libc::kill(-pgid, signal) }) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// A task process this agent did not start (a previous agent did), watched
/// through a pidfd: it is not our child, so its exit status is unknown.
pub(crate) struct Adopted {
    pidfd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Adopted {
    /// Watches `pid` if it is still the process that started at `start`
    /// (checked after the pidfd is open, so a reused PID is never taken).
    pub(crate) fn open(pid: u32, start: u64) -> io::Result<Adopted> {
        use std::os::fd::FromRawFd;
        let raw = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        if start_time(pid) != Some(start) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} is no longer the task's"),
            ));
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it (open,
        // the same description) until it is dropped.
        let pidfd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Adopted { pidfd })
    }

    /// Returns once the process has exited (a pidfd turns readable then).
    pub(crate) async fn exited(&self) {
        // An error here means the fd itself broke; treat it as gone.
        let _ = self.pidfd.readable().await;
    }
}

/// Whether process `pid` runs in a sandbox: its children go to a PID
/// namespace other than the agent's.
pub(crate) fn is_sandboxed(pid: u32) -> io::Result<bool> {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid_for_children"))?;
    let ours = std::fs::read_link("/proc/self/ns/pid")?;
    Ok(theirs != ours)
}

/// The start time of process `pid` in clock ticks since boot (field 22 of
/// /proc/PID/stat), which tells a process from a later one that reused its
/// PID.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How a process ended, as `service ps` shows it.
pub(crate) fn describe_exit(status: std::process::ExitStatus) -> (bool, String) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => (true, String::new()),
        (Some(code), _) => (false, format!("task: non-zero exit ({code})")),
        (None, Some(sig)) => (false, format!("task: killed by signal {sig}")),
        (None, None) => (false, "task: ended".into()),
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nweb:x:1000:1000::/home/web:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nweb:x:1000:\nstaff:x:50:\n";

    #[test]
    fn users_resolve_by_name_number_and_group() {
        assert_eq!(
            resolve_user("web", PASSWD, GROUP).unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                home: "/home/web".into()
            }
        );
        assert_eq!(resolve_user("65534", PASSWD, GROUP).unwrap().home, "/nonexistent");
        assert_eq!(resolve_user("web:staff", PASSWD, GROUP).unwrap().gid, 50);
        assert_eq!(
            resolve_user("4242:7", PASSWD, GROUP).unwrap(),
            User {
                uid: 4242,
                gid: 7,
                home: "/".into()
            }
        );
        assert!(resolve_user("ghost", PASSWD, GROUP)
            .unwrap_err()
            .to_string()
            .contains("no user \"ghost\""));
        assert!(resolve_user("web:ghosts", PASSWD, GROUP)
            .unwrap_err()
            .to_string()
            .contains("no group"));
        assert!(resolve_user(":0", PASSWD, GROUP)
            .unwrap_err()
            .to_string()
            .contains("expected USER"));
    }

    #[test]
    fn the_service_env_overrides_the_base() {
        let mut service = BTreeMap::new();
        service.insert("PATH".to_string(), "/opt/bin".to_string());
        service.insert("A".to_string(), "1".to_string());
        let env = environment(&service, "abc", "web.1", "/root");
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOSTNAME"], "abc");
        assert_eq!(env["MESH_TASK_NAME"], "web.1");
        assert_eq!(env["A"], "1");
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }
}
