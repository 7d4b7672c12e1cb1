//! `mesh-agent task-init`: the process that makes a task's sandbox and
//! becomes the task. Single-threaded and freshly exec'd, so it may fork
//! and allocate freely.

use std::{
    ffi::{CString, OsString},
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStringExt, net::UnixStream},
    },
    path::Path,
};

use super::{mounts, seccomp, Confinement, ExecSpec, InitRequest, InitSpec, EXEC_FAILED};

/// Runs a task init: reads its request from the socket on stdin and never
/// returns.
pub fn init_main() -> ! {
    let mut channel = match take_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-agent task-init: {e} (this command is the agent's own, not for operators)");
            exit(125)
        }
    };
    let mut bytes = Vec::new();
    let request = channel
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the task's spec: {e}"))
        .and_then(|_| {
            crate::api::msgpack::from_msgpack::<InitRequest>(&bytes).map_err(|e| format!("the task's spec: {e}"))
        });
    match request {
        Ok(InitRequest::Start(spec)) => start(spec, channel),
        Ok(InitRequest::Exec(spec)) => exec_in(spec, channel),
        Err(e) => fail(&mut channel, &e),
    }
}

/// The agent's socket, moved off stdin (close-on-exec), with /dev/null in
/// its place.
fn take_channel() -> io::Result<UnixStream> {
    // SAFETY: fcntl/open/dup2 on descriptors this process owns.
    unsafe {
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null < 0 || libc::dup2(null, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(null);
        let stream = UnixStream::from_raw_fd(fd);
        // A socket, or this is no task init.
        stream.peer_addr()?;
        Ok(stream)
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: ends the process; nothing is left to flush that matters.
    unsafe { libc::_exit(code) }
}

/// Tells the agent why the task could not start, and ends.
fn fail(channel: &mut UnixStream, why: &str) -> ! {
    let _ = channel.write_all(why.as_bytes());
    exit(125)
}

fn sys(what: &str, ret: libc::c_int) -> Result<(), String> {
    if ret < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn fork() -> Result<libc::pid_t, String> {
    // SAFETY: this process is single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    Ok(pid)
}

fn block_signals(block: bool) {
    // SAFETY: a signal set on the stack, filled or emptied before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

/// Waits for `pid`, retrying on interruption.
fn wait_for(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: a status on the stack.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                eprintln!("mesh-agent task-init: waiting for process {pid}: {e}");
                return None;
            }
        }
    }
}

/// Ends this process the way a child with wait status `status` ended: by
/// the same signal, or with the same code.
fn end_like(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and raising the signal on
        // ourselves; no core is written (the process is not dumpable).
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        exit(128 + sig)
    }
    exit(libc::WEXITSTATUS(status))
}

fn not_dumpable() {
    // SAFETY: a prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// The first process: sandbox, then watch the namespace's PID 1 and end as
/// the task ends.
fn start(spec: InitSpec, mut channel: UnixStream) -> ! {
    not_dumpable();
    if let Err(e) = enter(&spec) {
        fail(&mut channel, &format!("setting up the task's sandbox: {e}"));
    }
    // The task's wait status, from PID 1 to here.
    let mut fds = [0; 2];
    // SAFETY: a two-element array for pipe2.
    if let Err(e) = sys("pipe", unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }) {
        fail(&mut channel, &e);
    }
    // SAFETY: pipe2 just made these and nothing else owns them.
    let (mut status_in, status_out) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Signals for the task reach it through its process group; this
    // process and PID 1 wait them out.
    block_signals(true);
    match fork() {
        Err(e) => fail(&mut channel, &e),
        Ok(0) => pid_one(&spec, channel, status_out),
        Ok(pid) => {
            drop(channel);
            drop(status_out);
            let own = wait_for(pid);
            let mut task = [0u8; 4];
            match status_in.read_exact(&mut task) {
                Ok(()) => end_like(i32::from_ne_bytes(task)),
                Err(e) => {
                    eprintln!("mesh-agent task-init: the task's PID 1 ended without its status ({e})");
                    end_like(own.unwrap_or(1 << 8))
                }
            }
        }
    }
}

/// Namespaces and the file-system view, in the first process.
fn enter(spec: &InitSpec) -> Result<(), String> {
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| format!("joining the cgroup {}: {e}", procs.display()))?;
    }
    // SAFETY: plain system calls on this process.
    unsafe {
        sys("setsid", libc::setsid())?;
        let netns = File::open(&spec.netns).map_err(|e| format!("opening {}: {e}", spec.netns.display()))?;
        sys(
            "entering the task's network namespace",
            libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET),
        )?;
        sys(
            "making the task's namespaces",
            libc::unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID),
        )?;
        sys(
            "setting the hostname",
            libc::sethostname(spec.hostname.as_ptr().cast(), spec.hostname.len()),
        )?;
    }
    mounts::View {
        resolv_conf: spec.resolv_conf.as_deref(),
        binds: &spec.binds,
        masked: &spec.masked,
        mounts: &spec.mounts,
        read_only: spec.read_only,
    }
    .build()
    .map_err(|e| e.to_string())
}

/// The namespace's PID 1: mounts its /proc, starts the task, reaps
/// whatever ends in the namespace, and reports the task's end.
fn pid_one(spec: &InitSpec, mut channel: UnixStream, status_out: OwnedFd) -> ! {
    // Gone with the first process (the agent's handle on the task).
    // SAFETY: a prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if let Err(e) = mounts::mount_proc() {
        fail(&mut channel, &format!("setting up the task's sandbox: {e}"));
    }
    match fork() {
        Err(e) => fail(&mut channel, &e),
        Ok(0) => become_task(&spec.command, &spec.env, &spec.workdir, &spec.confinement, channel),
        Ok(task) => {
            drop(channel);
            let mut out = File::from(status_out);
            loop {
                let mut status = 0;
                // SAFETY: a status on the stack.
                let r = unsafe { libc::waitpid(-1, &mut status, 0) };
                if r == task {
                    let _ = out.write_all(&status.to_ne_bytes());
                    // The namespace's other processes go with PID 1.
                    exit(0)
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        eprintln!("mesh-agent task-init: waiting for the task: {e}");
                        exit(1)
                    }
                }
            }
        }
    }
}

/// Drops to the task's confinement and execs `command`; on failure tells
/// the agent why and ends.
fn become_task(
    command: &[String],
    env: &std::collections::BTreeMap<String, String>,
    workdir: &str,
    confinement: &Confinement,
    mut channel: UnixStream,
) -> ! {
    block_signals(false);
    if let Err(e) = confine(confinement, workdir) {
        fail(&mut channel, &e);
    }
    let errno = exec(command, env);
    fail(&mut channel, &format!("{EXEC_FAILED}{errno}"))
}

/// Capabilities, user, working directory, no_new_privs and seccomp, in
/// the order that keeps each step possible.
fn confine(confinement: &Confinement, workdir: &str) -> Result<(), String> {
    let filters: Vec<seccompiler::BpfProgram> = confinement.seccomp.iter().map(|f| seccomp::unpack(f)).collect();
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(40);
    // SAFETY: prctl and credential calls on this process.
    unsafe {
        for cap in 0..=last_cap {
            if cap >= 64 || confinement.caps & (1 << cap) == 0 {
                sys(
                    "dropping a capability",
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
                )?;
            }
        }
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        if let Some((uid, gid)) = confinement.user {
            sys("setgroups", libc::setgroups(1, &gid))?;
            sys("setgid", libc::setgid(gid))?;
            sys("setuid", libc::setuid(uid))?;
        }
        if libc::geteuid() == 0 {
            set_capabilities(confinement.caps)?;
        }
    }
    std::env::set_current_dir(workdir).map_err(|e| format!("changing to the working directory {workdir}: {e}"))?;
    // SAFETY: a prctl on this process.
    sys("setting no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    for filter in &filters {
        seccompiler::apply_filter(filter).map_err(|e| format!("loading the seccomp filter: {e}"))?;
    }
    Ok(())
}

/// Effective and permitted capabilities `caps`, none inheritable.
fn set_capabilities(caps: u64) -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: caps as u32,
            permitted: caps as u32,
            inheritable: 0,
        },
        Data {
            effective: (caps >> 32) as u32,
            permitted: (caps >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a v3 header and two data structs, as capset(2) takes.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    sys("setting the capabilities", r as libc::c_int)
}

/// execve of `command[0]`, looked up in the task's PATH as execvp does;
/// returns the errno that stopped it.
fn exec(command: &[String], env: &std::collections::BTreeMap<String, String>) -> i32 {
    let Some(program) = command.first().filter(|p| !p.is_empty()) else {
        return libc::ENOENT;
    };
    let to_c = |s: &str| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = command.iter().map(|a| to_c(a)).collect();
    let envp: Vec<CString> = env.iter().map(|(k, v)| to_c(&format!("{k}={v}"))).collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let candidates: Vec<OsString> = if program.contains('/') {
        vec![program.into()]
    } else {
        let path = env.get("PATH").map_or("/usr/local/bin:/usr/bin:/bin", String::as_str);
        path.split(':')
            .map(|dir| {
                Path::new(if dir.is_empty() { "." } else { dir })
                    .join(program)
                    .into_os_string()
            })
            .collect()
    };
    let mut errno = libc::ENOENT;
    for candidate in candidates {
        let Ok(path) = CString::new(candidate.into_vec()) else {
            continue;
        };
        // SAFETY: NUL-terminated strings in NULL-terminated arrays that
        // outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOENT);
        // As execvp: a permission problem is remembered, a missing file is not.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    errno
}

/// A command in a running task: its namespaces, then confined as it is.
fn exec_in(spec: ExecSpec, mut channel: UnixStream) -> ! {
    not_dumpable();
    if let Err(e) = join(spec.task_pid) {
        fail(&mut channel, &format!("entering the task: {e}"));
    }
    match fork() {
        Err(e) => fail(&mut channel, &e),
        Ok(0) => {
            // SAFETY: a prctl on this process: the command goes if the
            // agent kills this process (a timed-out check).
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            become_task(&spec.command, &spec.env, "/", &spec.confinement, channel)
        }
        Ok(pid) => {
            drop(channel);
            // Keep no copy of the command's output pipes.
            // SAFETY: closes this process's descriptors.
            unsafe { libc::close_range(0, u32::MAX, 0) };
            end_like(wait_for(pid).unwrap_or(1 << 8))
        }
    }
}

/// Enters the namespaces of the task whose first process is `task_pid`
/// (those of its PID 1, the first process's child).
fn join(task_pid: u32) -> Result<(), String> {
    let children = std::fs::read_to_string(format!("/proc/{task_pid}/task/{task_pid}/children"))
        .map_err(|e| format!("finding the task's processes: {e}"))?;
    let pid_one: u32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or("the task has no process left")?;
    let kinds = [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ];
    let files = kinds
        .iter()
        .map(|(name, kind)| {
            File::open(format!("/proc/{pid_one}/ns/{name}"))
                .map(|f| (f, *kind, *name))
                .map_err(|e| format!("opening its {name} namespace: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: setsid/setns on this process with descriptors it owns.
    unsafe {
        sys("setsid", libc::setsid())?;
        for (file, kind, name) in &files {
            sys(
                &format!("entering its {name} namespace"),
                libc::setns(file.as_raw_fd(), *kind),
            )?;
        }
    }
    Ok(())
}
