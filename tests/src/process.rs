//! Processes started inside a host's network namespace.
//!
//! The child enters the namespace between fork and exec (`setns` in
//! `pre_exec`), so the parent's threads never change namespace. Children
//! also get `PR_SET_PDEATHSIG(SIGKILL)`, so a test process that crashes
//! takes its children with it.

use std::{
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::agent::net::netns::NetNs;

/// A failure to start or wait for a process.
#[derive(Debug)]
pub struct ProcessError {
    pub command: String,
    pub source: io::Error,
}

/// A process running inside a host; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    command: String,
}

impl Process {
    /// Starts `command` inside namespace `ns`; killed when dropped.
    pub fn spawn_in(ns: &NetNs, mut command: Command) -> Result<Process, ProcessError> {
        let line = display(&command);
        enter_on_exec(&mut command, ns);
        let child = command.spawn().map_err(|source| ProcessError {
            command: line.clone(),
            source,
        })?;
        Ok(Process { child, command: line })
    }

    /// Runs `command` inside `ns` to completion, killing it after `timeout`.
    pub fn output_in(ns: &NetNs, mut command: Command, timeout: Duration) -> Result<Output, ProcessError> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = Process::spawn_in(ns, command)?;
        // Drain both pipes while waiting, so a chatty child cannot block on a full pipe.
        let stdout = drain(process.child.stdout.take());
        let stderr = drain(process.child.stderr.take());
        let waited = match process.wait_timeout(timeout) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => process.child.kill().and_then(|()| process.child.wait()),
            Err(e) => Err(e),
        };
        let status = waited.map_err(|source| ProcessError {
            command: process.command.clone(),
            source,
        })?;
        let joined = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout: joined(stdout),
            stderr: joined(stderr),
        })
    }

    /// The process id (in the root pid namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(|_| io::Error::other("pid out of range"))?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // unreaped child, so it cannot have been reused.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(mut self) -> io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a pipe to its end on a thread of its own.
fn drain(pipe: Option<impl io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Makes `command` enter `ns` in the child, right before exec.
fn enter_on_exec(command: &mut Command, ns: &NetNs) {
    let fd = ns.fd().as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, setns); `fd` stays open in the
    // child because the parent holds the NetNs while spawning.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The parent of process `pid` (PPid in /proc/PID/status).
pub fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:")?.trim().parse().ok())
}

/// Whether `pid` or one of its ancestors is in `set` (a task's program
/// runs under the init the agent records).
pub fn descends_from(pid: u32, set: &std::collections::BTreeSet<u32>) -> bool {
    let mut at = Some(pid);
    for _ in 0..16 {
        match at {
            Some(p) if set.contains(&p) => return true,
            Some(p) if p > 1 => at = parent_of(p),
            _ => return false,
        }
    }
    false
}

/// PIDs of processes whose command line contains `marker` (tests give
/// their tasks a unique marker argument to find them).
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(marker) {
                pids.push(pid);
            }
        }
    }
    pids
}
