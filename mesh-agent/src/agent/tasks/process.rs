//! Starting and signalling task processes: the one place that forks into a
//! task's namespaces.
//!
//! A task runs in its own session (so it outlives an agent restart and is
//! signalled as a group), inside the task's network namespace, with its own
//! UTS namespace (its hostname) and a private copy of the mount namespace
//! (mounts made for it, like secrets later, stay its own). Everything is
//! done between fork and exec, in the child, so no agent thread ever
//! changes namespace.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, fd::BorrowedFd, unix::process::CommandExt},
    process::Stdio,
};

use super::error::TaskError;

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
    /// Program and arguments.
    pub command: &'a [String],
    /// The whole environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory (default `/`).
    pub workdir: Option<&'a str>,
    /// Run as this user (default: the agent's, root).
    pub user: Option<&'a User>,
    /// The UTS namespace's hostname.
    pub hostname: &'a str,
    /// The task's network namespace.
    pub netns: BorrowedFd<'a>,
    /// Where stdout and stderr go (opened for appending).
    pub log: &'a File,
    /// Mounted over /etc/resolv.conf in the task's mount namespace.
    pub resolv_conf: Option<&'a std::path::Path>,
    /// The `cgroup.procs` file of the cgroup the task joins.
    pub cgroup_procs: Option<&'a std::path::Path>,
    /// Directories and files bind-mounted read-only in the task's mount
    /// namespace (source, where the task sees it): its secrets and configs.
    pub binds: &'a [(std::path::PathBuf, std::path::PathBuf)],
}

/// Starts a task process. The child is its own session leader, so its PID
/// is also its process group's ID.
pub fn spawn(launch: &Launch<'_>) -> io::Result<tokio::process::Child> {
    let program = launch
        .command
        .first()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the task has no command"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(&launch.command[1..])
        .env_clear()
        .envs(launch.env)
        .current_dir(launch.workdir.unwrap_or("/"))
        .stdin(Stdio::null())
        .stdout(launch.log.try_clone()?)
        .stderr(launch.log.try_clone()?);
    let hostname = CString::new(launch.hostname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "hostname holds a NUL"))?;
    let netns = launch.netns.as_raw_fd();
    let user = launch.user.map(|u| (u.uid, u.gid));
    let resolv_conf = launch.resolv_conf.map(crate::agent::net::netns::c_path).transpose()?;
    let cgroup_procs = launch.cgroup_procs.map(crate::agent::net::netns::c_path).transpose()?;
    let binds = launch
        .binds
        .iter()
        .map(|(from, to)| {
            Ok((
                crate::agent::net::netns::c_path(from)?,
                crate::agent::net::netns::c_path(to)?,
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls on values prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &cgroup_procs {
                join_cgroup(procs)?;
            }
            enter_task_namespaces(netns, &hostname, user, resolv_conf.as_deref(), &binds)
        });
    }
    tokio::process::Command::from(cmd).spawn()
}

/// In the forked child: writes its own PID to `procs` (no allocation).
fn join_cgroup(procs: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: getpid cannot fail.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    // SAFETY: a NUL-terminated path and a buffer of the stated length.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, digits[at..].as_ptr().cast(), digits.len() - at);
        libc::close(fd);
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the forked child: new session, the task's namespaces, then drop to
/// the task's user (last, since entering namespaces needs root).
fn enter_task_namespaces(
    netns: i32,
    hostname: &CString,
    user: Option<(u32, u32)>,
    resolv_conf: Option<&std::ffi::CStr>,
    binds: &[(CString, CString)],
) -> io::Result<()> {
    // SAFETY: plain system calls in a single-threaded child; the pointers
    // are valid NUL-terminated strings owned by the closure.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        check(libc::setns(netns, libc::CLONE_NEWNET))?;
        check(libc::unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWNS))?;
        check(libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()))?;
        // Mounts made in the task's namespace must not leak to the host's.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        // Names resolve through the agent's responder (`agent::net::dns`).
        if let Some(conf) = resolv_conf {
            check(libc::mount(
                conf.as_ptr(),
                c"/etc/resolv.conf".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
        }
        // Secrets and configs, read-only.
        for (from, to) in binds {
            check(libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                to.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ))?;
        }
        if let Some((uid, gid)) = user {
            check(libc::setgroups(1, &gid))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
    }
    Ok(())
}

/// Starts `sh -c COMMAND` inside a running task's namespaces (network,
/// UTS, mount) as the task's user, with the task's environment; stdout and
/// stderr are piped to the caller. This is how health checks run.
pub(crate) fn spawn_in_task(
    task_pid: u32,
    command: &str,
    env: &BTreeMap<String, String>,
    user: Option<&User>,
) -> io::Result<tokio::process::Child> {
    let open = |kind: &str| File::open(format!("/proc/{task_pid}/ns/{kind}"));
    let namespaces = [
        (open("net")?, libc::CLONE_NEWNET),
        (open("uts")?, libc::CLONE_NEWUTS),
        (open("mnt")?, libc::CLONE_NEWNS),
    ];
    let fds: Vec<(i32, i32)> = namespaces.iter().map(|(f, kind)| (f.as_raw_fd(), *kind)).collect();
    let user = user.map(|u| (u.uid, u.gid));
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env_clear()
        .envs(env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: as in `spawn`: system calls only, in the child, on fds that
    // stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for (fd, kind) in &fds {
                check(libc::setns(*fd, *kind))?;
            }
            if let Some((uid, gid)) = user {
                check(libc::setgroups(1, &gid))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd).kill_on_drop(true).spawn();
    drop(namespaces);
    child
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
