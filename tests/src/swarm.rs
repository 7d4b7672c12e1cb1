//! A swarm of real `mesh-agent` processes, one per host namespace, driven
//! with the real `meshctl` exactly as an operator would.
//!
//! Each agent keeps its data directory and socket under a directory of the
//! test's own (removed on drop) and logs to a file there; failures print the
//! agents' logs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{cluster::Cluster, process::Process};

/// The Raft timing tests use: twice the defaults, so many agents sharing two
/// cores with debug builds do not see spurious elections.
pub const AGENT_FLAGS: &[&str] = &["--raft-heartbeat", "100ms", "--raft-election-timeout", "500ms"];

/// [`AGENT_FLAGS`], with published ports reaching other nodes through the
/// routing-mesh tunnel even on the link.
pub const TUNNEL_AGENT_FLAGS: &[&str] = &[
    "--raft-heartbeat",
    "100ms",
    "--raft-election-timeout",
    "500ms",
    "--mesh-routing",
    "tunnel",
];

/// A built binary of the workspace (`cargo xtask test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("reason: the test knows its own path");
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let mut dir = exe.parent().expect("reason: an executable lives in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("reason: deps sits in the profile directory");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p mesh-agent-bin -p meshctl` (cargo xtask test does this)",
        path.display()
    );
    path
}

/// One agent's files and process.
pub struct Agent {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its local API socket.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    process: Option<Process>,
}

/// Agents on the hosts of a [`Cluster`].
pub struct Swarm {
    /// The hosts.
    pub cluster: Cluster,
    /// One agent per host.
    pub agents: Vec<Agent>,
    dir: PathBuf,
    flags: &'static [&'static str],
}

impl Swarm {
    /// `n` hosts, each running an agent that is not yet in a swarm.
    pub fn new(n: usize) -> Swarm {
        Swarm::with_flags(n, AGENT_FLAGS)
    }

    /// As [`Swarm::new`], with these `mesh-agent run` flags (none: the defaults).
    pub fn with_flags(n: usize, flags: &'static [&'static str]) -> Swarm {
        remove_stale_swarms();
        let cluster = Cluster::new(n).expect("build the hosts");
        let dir = std::env::temp_dir().join(format!("meshswarm-{}-{}", std::process::id(), unique()));
        let _ = fs::remove_dir_all(&dir);
        let agents = (0..n)
            .map(|i| {
                let base = dir.join(format!("h{i}"));
                fs::create_dir_all(&base).expect("create the agent's directory");
                Agent {
                    data_dir: base.join("data"),
                    socket: base.join("mesh.sock"),
                    log: base.join("agent.log"),
                    process: None,
                }
            })
            .collect();
        let mut swarm = Swarm {
            cluster,
            agents,
            dir,
            flags,
        };
        for i in 0..n {
            swarm.start(i);
        }
        swarm
    }

    /// The `mesh-agent run` flags of agents started from now on.
    pub fn set_flags(&mut self, flags: &'static [&'static str]) {
        self.flags = flags;
    }

    /// Starts host `i`'s agent and waits for its socket.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// Starts host `i`'s agent with `extra` flags and waits for its socket.
    pub fn start_with(&mut self, i: usize, extra: &[&str]) {
        let agent = &self.agents[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log)
            .expect("open the agent log");
        let mut cmd = Command::new(binary("mesh-agent"));
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&agent.data_dir)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--hostname")
            .arg(format!("h{i}"))
            .args(self.flags)
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let _ = fs::remove_file(&agent.socket);
        let process = self.cluster.host(i).spawn(cmd).expect("start mesh-agent");
        self.agents[i].process = Some(process);
        let socket = self.agents[i].socket.clone();
        self.wait(&format!("agent {i} socket"), Duration::from_secs(20), || {
            socket.exists()
        });
    }

    /// The process ID of host `i`'s agent, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.agents[i].process.as_ref().map(Process::pid)
    }

    /// SIGKILLs host `i`'s agent.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.agents[i].process.take() {
            let _ = p.kill();
        }
    }

    /// Stops host `i`'s agent as an operator or an upgrade would: SIGTERM,
    /// then SIGKILL if it has not exited within 10 s. Whether it exited by
    /// itself.
    pub fn stop(&mut self, i: usize) -> bool {
        let Some(mut p) = self.agents[i].process.take() else {
            return true;
        };
        if p.signal(libc::SIGTERM).is_err() {
            return false;
        }
        match p.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(_)) => true,
            _ => {
                let _ = p.kill();
                false
            }
        }
    }

    /// Runs `meshctl ARGS` against host `i`'s agent.
    pub fn meshctl(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("meshctl"));
        cmd.arg("--socket").arg(&self.agents[i].socket).args(args);
        self.cluster
            .host(i)
            .output(cmd, Duration::from_secs(60))
            .expect("run meshctl")
    }

    /// Runs `meshctl ARGS < file-with(input)`, as an operator pipes a key in.
    pub fn meshctl_stdin(&self, i: usize, args: &[&str], input: &str) -> Output {
        let file = self.dir.join(format!("stdin-{}", unique()));
        fs::write(&file, input).expect("write the input file");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("f=$1; shift; exec \"$@\" < \"$f\"")
            .arg("sh")
            .arg(&file)
            .arg(binary("meshctl"))
            .arg("--socket")
            .arg(&self.agents[i].socket)
            .args(args);
        let out = self
            .cluster
            .host(i)
            .output(cmd, Duration::from_secs(60))
            .expect("run meshctl");
        let _ = fs::remove_file(&file);
        out
    }

    /// Runs meshctl and returns its standard output; panics with the
    /// agents' logs if it fails.
    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.meshctl(i, args);
        if !out.status.success() {
            self.dump_logs();
            panic!(
                "meshctl {} on h{i} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs meshctl expecting failure; returns (exit code, stderr).
    pub fn fails(&self, i: usize, args: &[&str]) -> (i32, String) {
        let out = self.meshctl(i, args);
        assert!(
            !out.status.success(),
            "meshctl {} on h{i} should have failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Polls `done` every 100 ms until it holds, or panics after `timeout`
    /// with the agents' logs. Bounded: it never waits longer than `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prints every agent's log (for failures).
    pub fn dump_logs(&self) {
        for (i, a) in self.agents.iter().enumerate() {
            let text = fs::read_to_string(&a.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                if line.contains("panicked at") {
                    eprintln!(
                        "!!!!! h{i} agent PANIC: {line}\n!!!!! {}",
                        lines.get(n + 1).unwrap_or(&"")
                    );
                }
            }
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- h{i} agent log (last 60 lines) -----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }

    /// `swarm init` on host 0, advertising its underlay address.
    pub fn init(&self, extra: &[&str]) -> String {
        let addr = self.cluster.host(0).address().to_string();
        let mut args = vec![
            "swarm",
            "init",
            "--advertise-addr",
            &addr,
            "--dispatcher-heartbeat",
            "500ms",
        ];
        args.extend_from_slice(extra);
        self.ok(0, &args)
    }

    /// `swarm init` on h0, every other host joins as a worker, and all are Ready.
    pub fn form_with_workers(&self) {
        self.form(self.agents.len());
    }

    /// `swarm init` on host 0 and hosts 1..`members` joined as workers
    /// (the other hosts stay outside the swarm), then waits for them all.
    pub fn form(&self, members: usize) {
        self.init(&[]);
        for i in 1..members {
            self.join(i, 0, "worker");
        }
        self.wait(&format!("{members} nodes ready"), Duration::from_secs(30), || {
            self.ready(0) == members
        });
    }

    /// `swarm join` of host `i` through host `via` with the token for `role`.
    pub fn join(&self, i: usize, via: usize, role: &str) {
        let token = self.ok(via, &["swarm", "join-token", "-q", role]);
        let remote = format!("{}:2377", self.cluster.host(via).address());
        let addr = self.cluster.host(i).address().to_string();
        self.ok(
            i,
            &[
                "swarm",
                "join",
                "--token",
                token.trim(),
                "--advertise-addr",
                &addr,
                &remote,
            ],
        );
    }

    /// Host `i`'s own view of its swarm (`meshctl info --format json`).
    pub fn info(&self, i: usize) -> Option<mesh_agent::api::messages::SwarmInfo> {
        let out = self.meshctl(i, &["info", "--format", "json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The index host `i` has applied to its local copy of the store.
    pub fn applied(&self, i: usize) -> Option<u64> {
        self.info(i)?.raft?.last_applied
    }

    /// Whether managers `ms` have all applied the same index, at least `min`.
    pub fn stores_agree(&self, ms: &[usize], min: u64) -> bool {
        let applied: Vec<Option<u64>> = ms.iter().map(|m| self.applied(*m)).collect();
        applied.iter().all(|a| a.is_some_and(|a| a >= min)) && applied.windows(2).all(|w| w[0] == w[1])
    }

    /// How many nodes host `i`'s `node ls` shows as Ready.
    pub fn ready(&self, i: usize) -> usize {
        self.nodes(i).iter().filter(|n| n.1 == "Ready").count()
    }

    /// `node ls` rows on host `i` as (hostname, status, availability, manager status).
    pub fn nodes(&self, i: usize) -> Vec<(String, String, String, String)> {
        let out = self.meshctl(i, &["node", "ls"]);
        if !out.status.success() {
            return vec![];
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let Some(header) = lines.next() else { return vec![] };
        let col = |name: &str| header.find(name).expect("column present");
        let (h, s, a, m, v) = (
            col("HOSTNAME"),
            col("STATUS"),
            col("AVAILABILITY"),
            col("MANAGER STATUS"),
            col("AGENT VERSION"),
        );
        let cell =
            |line: &str, from: usize, to: usize| line.get(from..to.min(line.len())).unwrap_or("").trim().to_string();
        lines
            .map(|l| (cell(l, h, s), cell(l, s, a), cell(l, a, m), cell(l, m, v)))
            .collect()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill(i);
        }
        remove_swarm_dir(&self.dir);
    }
}

/// Stops the tasks the agents under `dir` left running (tasks outlive
/// their agent by design), unmounts their namespaces, and removes `dir`.
fn remove_swarm_dir(dir: &Path) {
    if let Ok(hosts) = fs::read_dir(dir) {
        for host in hosts.filter_map(Result::ok) {
            mesh_agent::agent::tasks::supervisor::reap_leftovers(&host.path().join("data").join("tasks"));
            mesh_agent::agent::tasks::cgroup::TaskCgroup::remove_recorded(&host.path().join("data"));
            mesh_agent::agent::mesh::bpffs::unmount(&host.path().join("data"));
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// Swarm directories of test processes that died without cleaning up.
fn remove_stale_swarms() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("meshswarm-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_swarm_dir(&entry.path());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
