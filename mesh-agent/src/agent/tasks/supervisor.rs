//! The node's task runner: applies the managers' assignments (the pure
//! [`plan::reconcile`]), starts each task in its namespaces, watches it,
//! checks its health, stops it with its grace period, and reports every
//! state change on a channel the agent forwards to the managers.
//!
//! Each task has a directory `<data-dir>/tasks/<task-id>/` holding its
//! network namespace (`netns`, a bind mount), its log (`log`: stdout and
//! stderr) and its process (`pid`: "PID START-TIME"). Tasks run in their
//! own session and outlive an agent restart: the restarted agent finds
//! what the old one left ([`find_leftovers`]), adopts those still assigned
//! (their process, addresses and ports stay as they are, so no connection
//! is interrupted) and kills the rest.

use super::{
    cgroup::{TaskCgroup, TaskLeaf},
    error::TaskError,
    sandbox::Confinement,
};
use crate::api::{
    mounts::{Mount, MountKind},
    resources::bytes_text,
};
use crate::locks::Locked;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use crate::agent::{
    net::{
        bridge::{Attachment, LocalNetwork},
        dns::Dns,
        netns::NetNs,
        overlay::Overlays,
    },
    tasks::{
        health::{Health, HealthTracker},
        plan::{self, Action, Local},
        process::{self, Launch, User},
    },
};
use crate::api::{
    objects::node_id_text,
    service::{Assignment, TaskReport, TaskSpec, TaskState},
};

/// How long a task's process waits for the nodes on its networks to learn
/// its endpoint before it starts anyway (a node that stopped answering is
/// Down after three missed heartbeats, 3 s by default, and then no longer
/// waited for).
pub(crate) const PEERS_WAIT: Duration = Duration::from_secs(5);

/// Waits until `peers` (how many nodes have yet to learn a task's
/// endpoint) is 0, or `limit` has passed; how many are left. `waiting` is
/// told each new count while it is not 0.
async fn wait_for_peers(mut peers: watch::Receiver<u32>, limit: Duration, mut waiting: impl FnMut(u32)) -> u32 {
    let deadline = tokio::time::Instant::now() + limit;
    let mut told = 0;
    loop {
        let left = *peers.borrow_and_update();
        if left == 0 {
            return 0;
        }
        if left != told {
            waiting(left);
            told = left;
        }
        match tokio::time::timeout_at(deadline, peers.changed()).await {
            Ok(Ok(())) => {}
            // Timed out, or the task is gone from the assignments.
            _ => return *peers.borrow(),
        }
    }
}

/// A health check's output kept for the task's error message.
const HEALTH_OUTPUT_MAX: usize = 200;

/// What every task's sandbox takes from the node.
pub(crate) struct SandboxSetup {
    /// The agent's binary, which starts each task as its init.
    pub(crate) init: PathBuf,
    /// The cgroups tasks run in (the VIP socket programs act there), if
    /// the host has cgroup v2.
    pub(crate) cgroups: Option<TaskCgroup>,
    /// What of the node tasks must not see.
    pub(crate) masked: Vec<PathBuf>,
    /// Where `--mount type=volume` directories are kept.
    pub(crate) volumes: PathBuf,
}

/// Runs this node's tasks.
pub(crate) struct Supervisor {
    dir: PathBuf,
    network: Arc<LocalNetwork>,
    overlays: Arc<Overlays>,
    dns: Arc<Dns>,
    /// What every task's sandbox takes from the node.
    setup: SandboxSetup,
    reports: mpsc::UnboundedSender<TaskReport>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Tasks started here and not yet ended, with their stop switch.
    running: BTreeMap<u64, watch::Sender<bool>>,
    /// Tasks that ended here, until the store stops listing them as live.
    ended: BTreeSet<u64>,
    /// Live processes a previous agent left: task -> (PID, start time);
    /// emptied by the first reconciliation.
    leftovers: BTreeMap<u64, (u32, u64)>,
    /// Tasks being started, with how many nodes have yet to learn their
    /// endpoint (from each new assignment, until the process starts).
    starting: BTreeMap<u64, watch::Sender<u32>>,
}

/// The directory name of a task.
pub fn task_dir_name(id: u64) -> String {
    node_id_text(id)
}

fn parse_task_dir_name(name: &str) -> Option<u64> {
    crate::api::objects::parse_node_id(name)
}

impl Supervisor {
    /// (tasks running here, tasks that ended here and are still listed).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = self.inner.locked();
        (inner.running.len(), inner.ended.len())
    }

    /// A runner keeping tasks under `dir`; first clears what a previous
    /// agent left there.
    pub(crate) fn new(
        dir: PathBuf,
        network: Arc<LocalNetwork>,
        overlays: Arc<Overlays>,
        dns: Arc<Dns>,
        setup: SandboxSetup,
        reports: mpsc::UnboundedSender<TaskReport>,
    ) -> io::Result<Arc<Supervisor>> {
        fs::create_dir_all(&dir)?;
        let leftovers = find_leftovers(&dir);
        Ok(Arc::new(Supervisor {
            dir,
            network,
            overlays,
            dns,
            setup,
            reports,
            inner: Mutex::new(Inner {
                leftovers,
                ..Inner::default()
            }),
        }))
    }

    /// Where task `id`'s log is.
    pub(crate) fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(task_dir_name(id)).join("log")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    fn report(&self, task: u64, state: TaskState, message: impl Into<String>) {
        let _ = self.reports.send(TaskReport {
            task,
            state,
            message: message.into(),
        });
    }

    /// Takes over the bridge addresses of the tasks a previous agent left
    /// that are still assigned, ahead of [`Supervisor::apply`]: the routing
    /// mesh is programmed before tasks are applied, and it serves only the
    /// local tasks whose address it knows, so without this a restarted
    /// agent's first sync would drop their backends until adoption ended.
    /// A task whose address cannot be read is left to its adoption, which
    /// reports why.
    pub(crate) async fn adopt_addresses(&self, assigned: &[Assignment]) {
        let pending: Vec<u64> = {
            let inner = self.lock();
            assigned
                .iter()
                .map(|a| a.task)
                .filter(|t| inner.leftovers.contains_key(t) && !inner.running.contains_key(t))
                .collect()
        };
        for task in pending {
            let netns = self.dir.join(task_dir_name(task)).join("netns");
            if let Err(e) = self.network.adopt(task, &netns).await {
                log::debug!(
                    "task {}: its address is read again on adoption: {e}",
                    task_dir_name(task)
                );
            }
        }
    }

    /// Brings this node in line with its assignments.
    pub(crate) fn apply(self: &Arc<Self>, assigned: &[Assignment], retained: &[u64]) {
        let dirs = task_dirs(&self.dir);
        let mut inner = self.lock();
        // Once the store lists an ended task as ended (or not at all), its
        // report arrived; stop remembering it.
        let live: BTreeSet<u64> = assigned.iter().map(|a| a.task).collect();
        inner.ended.retain(|id| live.contains(id));
        let local = Local {
            running: inner.running.keys().copied().collect(),
            ended: inner.ended.clone(),
            dirs,
            leftovers: inner.leftovers.keys().copied().collect(),
        };
        for a in assigned {
            if let Some(peers) = inner.starting.get(&a.task) {
                peers.send_if_modified(|n| std::mem::replace(n, a.endpoints_pending) != a.endpoints_pending);
            }
        }
        for action in plan::reconcile(assigned, retained, &local) {
            match action {
                Action::Start(a) => {
                    let (stop, stop_rx) = watch::channel(false);
                    inner.running.insert(a.task, stop);
                    let (peers, peers_rx) = watch::channel(a.endpoints_pending);
                    inner.starting.insert(a.task, peers);
                    tokio::spawn(self.clone().run(a, stop_rx, peers_rx));
                }
                Action::Stop(id) => {
                    if let Some(stop) = inner.running.get(&id) {
                        let _ = stop.send(true);
                    }
                }
                Action::Report(r) => {
                    inner.ended.insert(r.task);
                    let _ = self.reports.send(r);
                }
                Action::Forget(id) => {
                    let dir = self.dir.join(task_dir_name(id));
                    remove_namespace(&dir);
                    if let Err(e) = fs::remove_dir_all(&dir) {
                        log::warn!("removing {}: {e}", dir.display());
                    }
                }
                Action::Adopt(a) => {
                    let Some((pid, start)) = inner.leftovers.get(&a.task).copied() else {
                        continue;
                    };
                    let (stop, stop_rx) = watch::channel(false);
                    inner.running.insert(a.task, stop);
                    tokio::spawn(self.clone().run_adopted(a, pid, start, stop_rx));
                }
                Action::Reap(id) => {
                    if let Some((pid, start)) = inner.leftovers.get(&id).copied() {
                        reap(&self.dir.join(task_dir_name(id)), pid, start);
                    }
                }
            }
        }
        inner.leftovers.clear();
    }

    /// Stops every task (the node leaves the swarm) and waits for them to
    /// end, up to `limit`. Whether they all ended.
    pub(crate) async fn stop_all(&self, limit: Duration) -> bool {
        {
            let mut inner = self.lock();
            for stop in inner.running.values() {
                let _ = stop.send(true);
            }
            for (id, (pid, start)) in std::mem::take(&mut inner.leftovers) {
                reap(&self.dir.join(task_dir_name(id)), pid, start);
            }
        }
        let deadline = Instant::now() + limit;
        while !self.lock().running.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.lock().running.is_empty()
    }

    /// One task's life on this node.
    async fn run(self: Arc<Self>, a: Assignment, mut stop: watch::Receiver<bool>, peers: watch::Receiver<u32>) {
        let id = a.task;
        let dir = self.dir.join(task_dir_name(id));
        self.report(id, TaskState::Preparing, "");
        let prepared = self.prepare(&a, &dir, peers, stop.clone()).await;
        self.lock().starting.remove(&id);
        let (state, message) = match prepared {
            Err(e) => (TaskState::Rejected, e.to_string()),
            Ok(Some(prepared)) if !*stop.borrow() => {
                let ended = self.supervise(&a, prepared, &mut stop).await;
                self.oom_checked(&a, ended)
            }
            // Stopped while waiting for its peers, or as it was started.
            Ok(_) => (TaskState::Shutdown, "stopped before it started".to_string()),
        };
        self.finish(&a, &dir, state, message).await;
    }

    /// The life of a task a previous agent started: watched from here on
    /// with everything it has (process, addresses, ports) left as it is.
    async fn run_adopted(self: Arc<Self>, a: Assignment, pid: u32, start: u64, mut stop: watch::Receiver<bool>) {
        let dir = self.dir.join(task_dir_name(a.task));
        let (state, message) = match self.readopt(&a, &dir, pid, start).await {
            Err(e) => {
                let _ = process::signal_group(pid, libc::SIGKILL);
                (TaskState::Failed, e.to_string())
            }
            Ok(prepared) => {
                log::info!("task {} ({}) adopted: pid {pid}", task_dir_name(a.task), a.spec.name);
                let ended = self.supervise(&a, prepared, &mut stop).await;
                self.oom_checked(&a, ended)
            }
        };
        self.finish(&a, &dir, state, message).await;
    }

    /// A task's end as reported: an OOM kill in its cgroup is said as such
    /// (the process itself only shows SIGKILL).
    fn oom_checked(&self, a: &Assignment, (state, message): (TaskState, String)) -> (TaskState, String) {
        let Some(cgroups) = &self.setup.cgroups else {
            return (state, message);
        };
        if state == TaskState::Shutdown || cgroups.existing_leaf(&task_dir_name(a.task)).oom_kills() == 0 {
            return (state, message);
        }
        let limit = a.spec.resources.memory_limit.map(bytes_text);
        let message = match limit {
            Some(limit) => format!("OOM killed: the task went over its memory limit ({limit})"),
            None => "OOM killed".to_string(),
        };
        (TaskState::Failed, message)
    }

    /// Detaches an ended task, removes its namespace and cgroups and
    /// reports it.
    async fn finish(&self, a: &Assignment, dir: &Path, state: TaskState, message: String) {
        let id = a.task;
        if let Some(cgroups) = &self.setup.cgroups {
            let leaf = cgroups.existing_leaf(&task_dir_name(id));
            let _ = tokio::task::spawn_blocking(move || leaf.remove()).await;
        }
        self.dns.stop(id);
        self.overlays.detach(id).await;
        self.network.detach(id).await;
        remove_namespace(dir);
        let _ = fs::remove_file(dir.join("pid"));
        log::info!(
            "task {} ({}) {}: {message}",
            task_dir_name(id),
            a.spec.name,
            state.name()
        );
        let mut inner = self.lock();
        inner.running.remove(&id);
        inner.ended.insert(id);
        self.report(id, state, message);
    }

    /// Creates the task's namespace, network and log, and starts it once
    /// the nodes on its networks know its endpoint (`peers`: how many do
    /// not yet), or [`PEERS_WAIT`] has passed; `None` if `stop` came first.
    async fn prepare(
        &self,
        a: &Assignment,
        dir: &Path,
        peers: watch::Receiver<u32>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Option<Prepared>, TaskError> {
        let spec = &a.spec;
        fs::create_dir_all(dir).map_err(TaskError::io(format!("creating {}", dir.display())))?;
        let user = task_user(spec)?;
        let ns_path = dir.join("netns");
        remove_namespace(dir);
        // Held until the task runs in it.
        let _netns = NetNs::create_at(&ns_path, &format!("task {}", task_dir_name(a.task)))?;
        let attachment = self
            .network
            .attach(a.task, &ns_path)
            .await
            .map_err(|source| TaskError::Bridge {
                doing: "attaching the task to the node's bridge network",
                source,
            })?;
        self.overlays.attach(a.task, &ns_path, &spec.networks).await?;
        let resolv_conf = self.start_dns(a, dir)?;
        let leaf = match &self.setup.cgroups {
            Some(cgroups) => Some(cgroups.leaf(&task_dir_name(a.task), &spec.resources)?),
            None if spec.resources.limits_anything() => return Err(TaskError::NoCgroups),
            None => None,
        };
        let cgroup_procs = leaf.as_ref().map(TaskLeaf::procs).unwrap_or_default();
        let confinement = task_confinement(spec, user.as_ref())?;
        let mounts = resolve_mounts(&spec.mounts, &self.setup.volumes)?;
        let waited = wait_for_peers(peers, PEERS_WAIT, |n| {
            self.report(
                a.task,
                TaskState::Starting,
                format!("waiting for {n} node(s) on its networks to learn its endpoint"),
            )
        });
        let left = tokio::select! {
            left = waited => left,
            _ = stop.wait_for(|stopped| *stopped) => return Ok(None),
        };
        let note = match left {
            0 => String::new(),
            n => {
                log::warn!(
                    "task {} ({}): starting after {PEERS_WAIT:?} with {n} node(s) on its networks (when last told) yet to learn its endpoint",
                    task_dir_name(a.task),
                    spec.name
                );
                // The count is the last one the managers sent, not a live one.
                format!(
                    "started after {}s before every node on its networks had learnt its endpoint: its first connections to tasks there may go unanswered until they have",
                    PEERS_WAIT.as_secs()
                )
            }
        };
        self.report(a.task, TaskState::Starting, "");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(dir.join("log"))
            .map_err(TaskError::io("opening the task's log"))?;
        let hostname = task_dir_name(a.task);
        let home = user.as_ref().map_or("/root", |u| u.home.as_str());
        let env = process::environment(&spec.env, &hostname, &spec.name, home);
        // Unmounted from the node's namespace when this goes out of scope:
        // by then the task holds its own mount.
        let staged = if spec.files.is_empty() {
            None
        } else {
            Some(crate::agent::tasks::files::stage(&dir.join("files"), &spec.files)?)
        };
        let child = process::spawn(&Launch {
            init: &self.setup.init,
            command: &spec.command,
            env: &env,
            workdir: spec.workdir.as_deref(),
            hostname: &hostname,
            netns: &ns_path,
            log: &log,
            resolv_conf: resolv_conf.as_deref(),
            cgroup_procs: &cgroup_procs,
            binds: staged.as_ref().map_or(&[], |s| s.binds.as_slice()),
            masked: &self.setup.masked,
            confinement: &confinement,
            read_only: spec.security.read_only,
            mounts: &mounts,
        })
        .await
        .map_err(|source| TaskError::Spawn {
            program: spec.command.first().cloned().unwrap_or_default(),
            source,
        })?;
        drop(staged);
        let pid = child.id().ok_or(TaskError::Vanished)?;
        let child = TaskProcess::Child(child);
        let start = process::start_time(pid).unwrap_or(0);
        if let Err(e) = fs::write(dir.join("pid"), format!("{pid} {start}\n")) {
            log::warn!("recording task {}'s PID: {e}", task_dir_name(a.task));
        }
        Ok(Some(Prepared {
            process: child,
            pid,
            env,
            confinement,
            attachment,
            note,
        }))
    }

    /// Starts answering DNS in task `a`'s namespace; the resolv.conf to give
    /// it (none if the host has no /etc/resolv.conf to mount it over).
    fn start_dns(&self, a: &Assignment, dir: &Path) -> Result<Option<PathBuf>, TaskError> {
        let networks = a.spec.networks.iter().map(|n| n.network).collect();
        self.dns.serve(a.task, &dir.join("netns"), networks)?;
        if !Path::new("/etc/resolv.conf").exists() {
            return Ok(None);
        }
        Dns::resolv_conf(dir)
            .map(Some)
            .map_err(TaskError::io("writing the task's resolv.conf"))
    }

    /// What a previous agent left of task `a`: its process, its address on
    /// the node bridge and its overlay ports, taken over as they are.
    async fn readopt(&self, a: &Assignment, dir: &Path, pid: u32, start: u64) -> Result<Prepared, TaskError> {
        let spec = &a.spec;
        let adopted = process::Adopted::open(pid, start).map_err(TaskError::Adopt)?;
        if !process::is_sandboxed(pid).map_err(TaskError::Adopt)? {
            return Err(TaskError::Unsandboxed);
        }
        let user = task_user(spec)?;
        let confinement = task_confinement(spec, user.as_ref())?;
        let attachment = self
            .network
            .adopt(a.task, &dir.join("netns"))
            .await
            .map_err(|source| TaskError::Bridge {
                doing: "the task's address could not be adopted after an agent restart",
                source,
            })?;
        self.overlays.adopt(a.task, spec.networks.len()).await;
        self.start_dns(a, dir)?;
        let hostname = task_dir_name(a.task);
        let home = user.as_ref().map_or("/root", |u| u.home.as_str());
        let env = process::environment(&spec.env, &hostname, &spec.name, home);
        if a.state < TaskState::Running && spec.health.is_none() {
            // The previous agent may have died before saying so.
            self.report(a.task, TaskState::Running, "");
        }
        Ok(Prepared {
            process: TaskProcess::Adopted(adopted),
            pid,
            env,
            confinement,
            attachment,
            note: String::new(),
        })
    }

    /// Watches a started task until it ends or is stopped; returns its
    /// final state and why.
    async fn supervise(
        &self,
        a: &Assignment,
        mut p: Prepared,
        stop: &mut watch::Receiver<bool>,
    ) -> (TaskState, String) {
        let id = a.task;
        log::info!(
            "task {} ({}) started: pid {}, address {}",
            task_dir_name(id),
            a.spec.name,
            p.pid,
            p.attachment.address
        );
        let (health_tx, mut health_rx) = mpsc::channel(4);
        let checker = match &a.spec.health {
            Some(check) => Some(tokio::spawn(health_loop(
                self.setup.init.clone(),
                p.pid,
                check.clone(),
                p.env.clone(),
                p.confinement.clone(),
                health_tx,
            ))),
            None => {
                self.report(id, TaskState::Running, p.note.clone());
                None
            }
        };
        let mut healthy = false;
        let outcome = loop {
            tokio::select! {
                    status = p.process.wait() => {
                    break match status {
                        Ok(Some(status)) => match process::describe_exit(status) {
                            (true, _) => (TaskState::Complete, "finished".to_string()),
                            (false, why) => (TaskState::Failed, why),
                        },
                        Ok(None) => (
                            TaskState::Failed,
                            "task: exited (its exit status is unknown: it was adopted after an agent restart)".to_string(),
                        ),
                        Err(e) => (TaskState::Failed, format!("waiting for the task: {e}")),
                    };
                }
                _ = stop.changed() => {
                    graceful_stop(&mut p, Duration::from_millis(a.spec.stop_grace_ms)).await;
                    break (TaskState::Shutdown, "shut down".to_string());
                }
                Some((verdict, output)) = health_rx.recv() => match verdict {
                    Health::Healthy if !healthy => {
                        healthy = true;
                        self.report(id, TaskState::Running, p.note.clone());
                    }
                    Health::Unhealthy => {
                        let _ = process::signal_group(p.pid, libc::SIGKILL);
                        let _ = p.process.wait().await;
                        break (TaskState::Failed, format!("task: unhealthy: {output}"));
                    }
                    _ => {}
                }
            }
        };
        if let Some(c) = checker {
            c.abort();
        }
        // Anything the task left in its process group goes with it.
        let _ = process::signal_group(p.pid, libc::SIGKILL);
        let (state, message) = outcome;
        if p.note.is_empty() {
            (state, message)
        } else {
            // Kept with the outcome: a short task's Running was never seen.
            (state, format!("{message}; {}", p.note))
        }
    }
}

/// A task's process: started by this agent, or adopted from a previous one.
enum TaskProcess {
    Child(tokio::process::Child),
    Adopted(process::Adopted),
}

impl TaskProcess {
    /// Waits for the process to end; its status if it is our child.
    async fn wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self {
            TaskProcess::Child(c) => c.wait().await.map(Some),
            TaskProcess::Adopted(a) => {
                a.exited().await;
                Ok(None)
            }
        }
    }
}

/// What [`Supervisor::prepare`] hands to [`Supervisor::supervise`].
struct Prepared {
    process: TaskProcess,
    pid: u32,
    env: BTreeMap<String, String>,
    /// The task's capabilities, seccomp and user (its health checks get them).
    confinement: Confinement,
    attachment: Attachment,
    /// What to say with Running (a start that did not wait for its peers).
    note: String,
}

/// `mounts` as this node makes them: a volume becomes its directory under
/// `volumes` (made on first use, kept across the task's restarts); a bind's
/// source and every target must exist (tasks see the node's file system,
/// so nothing is created there for them).
fn resolve_mounts(mounts: &[Mount], volumes: &Path) -> Result<Vec<Mount>, TaskError> {
    let refuse = |m: &Mount, reason: String| TaskError::Mount {
        mount: m.text(),
        reason,
    };
    mounts
        .iter()
        .map(|m| {
            let mut resolved = m.clone();
            match m.kind {
                MountKind::Volume => {
                    let dir = volumes.join(&m.source);
                    fs::create_dir_all(&dir)
                        .map_err(|e| refuse(m, format!("creating the volume's directory {}: {e}", dir.display())))?;
                    resolved.kind = MountKind::Bind;
                    resolved.source = dir.display().to_string();
                }
                MountKind::Bind if !Path::new(&m.source).exists() => {
                    return Err(refuse(m, format!("the source {} does not exist on this node", m.source)));
                }
                _ => {}
            }
            if !Path::new(&m.target).exists() {
                return Err(refuse(
                    m,
                    format!(
                        "the target {} does not exist on this node (tasks see the node's file system: mount over a path that exists)",
                        m.target
                    ),
                ));
            }
            Ok(resolved)
        })
        .collect()
}

/// How `spec`'s task is confined, running as `user`.
fn task_confinement(spec: &TaskSpec, user: Option<&User>) -> Result<Confinement, TaskError> {
    process::confinement(&spec.security, user).map_err(TaskError::io("the service's capabilities"))
}

/// The user `--user` names, from this node's /etc/passwd and /etc/group.
fn task_user(spec: &TaskSpec) -> Result<Option<User>, TaskError> {
    let Some(u) = &spec.user else { return Ok(None) };
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    process::resolve_user(u, &passwd, &group).map(Some)
}

/// SIGTERM to the task's group, SIGKILL after the grace period.
async fn graceful_stop(p: &mut Prepared, grace: Duration) {
    let _ = process::signal_group(p.pid, libc::SIGTERM);
    if tokio::time::timeout(grace, p.process.wait()).await.is_err() {
        let _ = process::signal_group(p.pid, libc::SIGKILL);
        let _ = p.process.wait().await;
    }
}

/// Runs the health check every interval and sends each verdict (with the
/// check's output) until the receiver is gone.
async fn health_loop(
    init: PathBuf,
    pid: u32,
    check: crate::api::service::HealthCheck,
    env: BTreeMap<String, String>,
    confinement: Confinement,
    verdicts: mpsc::Sender<(Health, String)>,
) {
    let started = Instant::now();
    let mut tracker = HealthTracker::default();
    loop {
        tokio::time::sleep(Duration::from_millis(check.interval_ms)).await;
        let (passed, output) = run_check(&init, pid, &check, &env, &confinement).await;
        let since = started.elapsed().as_millis() as u64;
        let verdict = tracker.record(passed, since, &check);
        if verdicts.send((verdict, output)).await.is_err() {
            return;
        }
    }
}

async fn run_check(
    init: &Path,
    pid: u32,
    check: &crate::api::service::HealthCheck,
    env: &BTreeMap<String, String>,
    confinement: &Confinement,
) -> (bool, String) {
    let child = match process::spawn_in_task(init, pid, &check.command, env, confinement.clone()).await {
        Ok(c) => c,
        Err(e) => return (false, format!("running the health check: {e}")),
    };
    match tokio::time::timeout(Duration::from_millis(check.timeout_ms), child.wait_with_output()).await {
        Err(_) => (false, format!("health check timed out after {} ms", check.timeout_ms)),
        Ok(Err(e)) => (false, format!("health check: {e}")),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let mut text = text.trim().replace('\n', " ");
            if text.len() > HEALTH_OUTPUT_MAX {
                let mut cut = HEALTH_OUTPUT_MAX;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            let (passed, why) = process::describe_exit(out.status);
            let detail = if passed {
                text
            } else {
                format!("health check failed ({}): {text}", why.trim_start_matches("task: "))
            };
            (passed, detail)
        }
    }
}

/// Task IDs with a directory under `dir`.
fn task_dirs(dir: &Path) -> BTreeSet<u64> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| parse_task_dir_name(&e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

fn remove_namespace(task_dir: &Path) {
    let path = task_dir.join("netns");
    if path.exists() {
        if let Err(e) = NetNs::delete_at(&path, "task") {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

/// The live task processes a previous agent left under `dir` (checking
/// the recorded start time, so a reused PID is never taken for a task).
/// What is left of dead ones (PID file, namespace) is removed.
pub(crate) fn find_leftovers(dir: &Path) -> BTreeMap<u64, (u32, u64)> {
    let mut alive = BTreeMap::new();
    for id in task_dirs(dir) {
        let task_dir = dir.join(task_dir_name(id));
        if let Ok(text) = fs::read_to_string(task_dir.join("pid")) {
            let mut fields = text.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(pid)), Some(Ok(start))) = (fields.next(), fields.next()) {
                let pid = pid as u32;
                if process::start_time(pid) == Some(start) {
                    alive.insert(id, (pid, start));
                    continue;
                }
            }
            let _ = fs::remove_file(task_dir.join("pid"));
        }
        remove_namespace(&task_dir);
    }
    alive
}

/// Kills every task process left under `dir` and removes their namespaces
/// (cleaning up after agents that are gone for good).
pub fn reap_leftovers(dir: &Path) {
    for (id, (pid, start)) in find_leftovers(dir) {
        reap(&dir.join(task_dir_name(id)), pid, start);
    }
}

/// Kills a leftover task process (if it is still the one recorded) and
/// removes its namespace.
fn reap(task_dir: &Path, pid: u32, start: u64) {
    if process::start_time(pid) == Some(start) {
        log::info!("stopping a task left by a previous agent (pid {pid}): it is no longer assigned here");
        let _ = process::signal_group(pid, libc::SIGKILL);
    }
    let _ = fs::remove_file(task_dir.join("pid"));
    remove_namespace(task_dir);
}
