//! Chaos under load (issue 8): five nodes (three managers, two workers)
//! and a client host outside the swarm. A published HTTP service answers
//! the client on every node while the run injects faults one at a time in
//! a seeded order: the leader's agent killed, a worker's agent killed, a
//! manager cut off the underlay, an agent restarted gracefully, a node
//! drained. After each fault is lifted the run waits for the swarm to
//! converge, then keeps the load on for a quiet window in which no request
//! may fail. Meanwhile writers store numbered configs through every
//! manager. At the end it checks that every acknowledged write is in the
//! store, that no node runs a task the cluster does not assign to it, and
//! that removing the service and its network leaves every host's kernel as
//! it was before they were created.
//!
//! The decisions (the schedule, attributing requests to faults, comparing
//! tables, tasks and kernel snapshots, the report) are plain functions
//! over plain data, unit-tested below; [`run`] drives the real agents.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use mesh_agent::runtime::{netns::NetNs, process::start_time, supervisor::task_dir_name};
use mesh_common::lb::Backend;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::{
    cluster::host_address,
    mesh::{backends_on, http_get},
    process::{processes_with, Process},
    swarm::{binary, Swarm},
};

/// The swarm's managers (host indexes).
pub const MANAGERS: [usize; 3] = [0, 1, 2];
/// The swarm's workers.
pub const WORKERS: [usize; 2] = [3, 4];
/// Every node of the swarm: managers, then workers.
pub const NODES: [usize; 5] = [0, 1, 2, 3, 4];
/// The host that sends the requests; its agent never joins.
pub const CLIENT: usize = 5;
/// The published service, its network and port.
pub const SERVICE: &str = "web";
pub const NETWORK: &str = "chaos-net";
pub const PORT: u16 = 8080;

/// How long a fault lasts before it is lifted: drawn per fault, in
/// 500 ms steps. The longest outlast a Down node's 1.5 s and the 5 s
/// grace before its tasks are placed elsewhere, so some faults move tasks
/// and leave the node with tasks it must stop once it is back.
pub const HOLD_MIN: Duration = Duration::from_millis(1000);
pub const HOLD_MAX: Duration = Duration::from_millis(8000);

/// What the run does to the swarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL the Raft leader's agent, restart it after the hold.
    KillLeader,
    /// SIGKILL a worker's agent, restart it after the hold.
    KillWorker,
    /// Cut a manager off the underlay, heal it after the hold.
    PartitionManager,
    /// SIGTERM an agent (as an upgrade would), start it after the hold.
    RestartAgent,
    /// `node update --availability drain`, back to active after the hold.
    DrainNode,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::KillLeader,
        FaultKind::KillWorker,
        FaultKind::PartitionManager,
        FaultKind::RestartAgent,
        FaultKind::DrainNode,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill leader",
            FaultKind::KillWorker => "kill worker",
            FaultKind::PartitionManager => "partition manager",
            FaultKind::RestartAgent => "restart agent",
            FaultKind::DrainNode => "drain node",
        }
    }

    /// The hosts it may hit; empty: the leader of the moment.
    fn candidates(self) -> &'static [usize] {
        match self {
            FaultKind::KillLeader => &[],
            FaultKind::KillWorker => &WORKERS,
            FaultKind::PartitionManager => &MANAGERS,
            FaultKind::RestartAgent | FaultKind::DrainNode => &NODES,
        }
    }
}

/// One planned fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// The host it hits; `None`: whichever manager leads when it comes.
    pub node: Option<usize>,
    /// How long it lasts before it is lifted.
    pub hold: Duration,
}

/// `count` faults drawn from `seed`: each full round of five is a shuffle
/// of every kind, so any `count >= 5` covers each kind; targets and holds
/// are drawn too. The same seed always gives the same schedule.
pub fn schedule(seed: u64, count: usize) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds = Vec::with_capacity(count);
    while kinds.len() < count {
        let mut round = FaultKind::ALL;
        round.shuffle(&mut rng);
        kinds.extend(round.into_iter().take(count - kinds.len()));
    }
    let steps = (HOLD_MAX - HOLD_MIN).as_millis() as u64 / 500;
    kinds
        .into_iter()
        .map(|kind| Fault {
            kind,
            node: kind.candidates().choose(&mut rng).copied(),
            hold: HOLD_MIN + Duration::from_millis(500 * rng.gen_range(0..=steps)),
        })
        .collect()
}

/// One request of the client load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// When it started, since the run's epoch.
    pub at: Duration,
    /// The node whose published port it asked.
    pub node: usize,
    /// `None`: answered; else why it failed.
    pub error: Option<String>,
}

/// Requests started in a window, and the failed ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: usize,
    pub failed: usize,
    /// The first few failures, for the report.
    pub errors: Vec<String>,
}

/// The requests that started in `[from, until)`, by start time: a request
/// that was in flight when the swarm converged counts where it began.
pub fn tally(requests: &[Request], from: Duration, until: Duration) -> Tally {
    let mut t = Tally::default();
    for r in requests.iter().filter(|r| r.at >= from && r.at < until) {
        t.requests += 1;
        if let Some(e) = &r.error {
            t.failed += 1;
            if t.errors.len() < 3 {
                t.errors.push(format!("{:.1}s h{}: {e}", r.at.as_secs_f64(), r.node));
            }
        }
    }
    t
}

/// Whether one node's published-port backends match the running tasks:
/// one backend per task on the task's node, local exactly for the node's
/// own tasks. VIP backends (node 0) are not the published port's.
pub fn tables_agree(backends: &[Backend], task_nodes: &[Ipv4Addr], me: Ipv4Addr) -> bool {
    let wire = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let published: Vec<&Backend> = backends.iter().filter(|b| b.node != 0).collect();
    let mut have: Vec<u32> = published.iter().map(|b| b.node).collect();
    let mut want: Vec<u32> = task_nodes.iter().map(|a| wire(*a)).collect();
    have.sort_unstable();
    want.sort_unstable();
    have == want && published.iter().all(|b| (b.local != 0) == (b.node == wire(me)))
}

/// A task as `service ps --format json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRow {
    /// Its directory name on its node.
    pub task: String,
    /// The host it is assigned to, if any.
    pub host: Option<usize>,
    pub state: String,
    pub desired: String,
}

/// Parses `service ps --format json`; the harness names host i's node "hI".
pub fn task_rows(json: &str) -> Result<Vec<TaskRow>, String> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(json).map_err(|e| format!("service ps: {e}"))?;
    rows.iter()
        .map(|t| {
            let id = t["task"]["id"].as_u64().ok_or("service ps: a task without an ID")?;
            Ok(TaskRow {
                task: task_dir_name(id),
                host: t["node_hostname"]
                    .as_str()
                    .and_then(|h| h.strip_prefix('h'))
                    .and_then(|n| n.parse().ok()),
                state: t["task"]["state"].as_str().unwrap_or_default().to_string(),
                desired: t["task"]["desired"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

const TERMINAL: [&str; 5] = ["Complete", "Failed", "Shutdown", "Rejected", "Orphaned"];

/// Whether the service has settled: `replicas` tasks meant to run and
/// running, every other task ended (none still starting or stopping).
/// `Err` says what is not there yet.
pub fn tasks_settled(rows: &[TaskRow], replicas: usize) -> Result<(), String> {
    let running = rows
        .iter()
        .filter(|t| t.desired == "Running" && t.state == "Running")
        .count();
    if running != replicas {
        return Err(format!("{running} of {replicas} tasks running"));
    }
    let moving: Vec<String> = rows
        .iter()
        .filter(|t| t.desired != "Running" && !TERMINAL.contains(&t.state.as_str()))
        .map(|t| format!("{} {} (desired {})", t.task, t.state, t.desired))
        .collect();
    if !moving.is_empty() {
        return Err(format!("tasks still stopping: {}", moving.join(", ")));
    }
    Ok(())
}

/// The tasks a node runs that the cluster does not assign to it (it
/// should run only those it is told to, desired Running): "hN TASK" each.
pub fn orphans(rows: &[TaskRow], live: &BTreeMap<usize, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (host, tasks) in live {
        for task in tasks {
            let assigned = rows
                .iter()
                .any(|r| &r.task == task && r.host == Some(*host) && r.desired == "Running");
            if !assigned {
                out.push(format!(
                    "h{host} runs task {task}, which the cluster does not assign to it"
                ));
            }
        }
    }
    out
}

/// The tasks the store says run that their node does not run: "hN TASK"
/// each. None may be missing once the swarm has converged.
pub fn missing_tasks(rows: &[TaskRow], live: &BTreeMap<usize, BTreeSet<String>>) -> Vec<String> {
    rows.iter()
        .filter(|r| r.desired == "Running" && r.state == "Running")
        .filter(|r| {
            !r.host
                .is_some_and(|h| live.get(&h).is_some_and(|l| l.contains(&r.task)))
        })
        .map(|r| match r.host {
            Some(h) => format!("the store says h{h} runs task {}, which h{h} does not run", r.task),
            None => format!("the store says task {} runs, on no node", r.task),
        })
        .collect()
}

/// What differs between two snapshots of a host's kernel objects: "+"
/// for objects left behind, "-" for objects that went missing.
pub fn differences(host: usize, before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    let left = after.difference(before).map(|o| format!("h{host} + {o}"));
    let gone = before.difference(after).map(|o| format!("h{host} - {o}"));
    left.chain(gone).collect()
}

/// The acknowledged writes the store does not hold.
pub fn lost_writes(acknowledged: &[String], present: &BTreeSet<String>) -> Vec<String> {
    acknowledged.iter().filter(|w| !present.contains(*w)).cloned().collect()
}

/// What one fault did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultOutcome {
    pub fault: Fault,
    /// The host it hit (the leader's, for [`FaultKind::KillLeader`]).
    pub target: usize,
    /// Since the run's epoch.
    pub injected: Duration,
    pub lifted: Duration,
    /// `None`: it did not converge within the run's bound.
    pub converged: Option<Duration>,
    /// Requests from injection to convergence.
    pub during: Tally,
    /// Requests in the quiet window after convergence: must all succeed.
    pub after: Tally,
    /// Tasks running where the cluster does not assign them, once converged.
    pub orphans: Vec<String>,
}

impl FaultOutcome {
    /// From the fault being lifted to the swarm converged.
    pub fn recovery(&self) -> Option<Duration> {
        self.converged.map(|c| c.saturating_sub(self.lifted))
    }
}

/// Everything a run found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub replicas: usize,
    /// Requests before the first fault, with the swarm whole.
    pub steady: Tally,
    pub faults: Vec<FaultOutcome>,
    pub requests: usize,
    pub writes_acknowledged: usize,
    pub writes_refused: usize,
    pub writes_lost: Vec<String>,
    /// Tasks found running where not assigned, at the end and after the
    /// service was removed.
    pub orphans: Vec<String>,
    /// Kernel objects the service and its network made on the nodes.
    pub service_objects: usize,
    /// Kernel objects that differ from before the service was created.
    pub leaked: Vec<String>,
    /// Problems that stopped the run from checking something.
    pub errors: Vec<String>,
    pub duration: Duration,
}

impl Report {
    /// Every must-be-zero figure that is not zero, said plainly.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.steady.failed > 0 {
            v.push(format!(
                "{} requests failed before any fault: {:?}",
                self.steady.failed, self.steady.errors
            ));
        }
        for (n, f) in self.faults.iter().enumerate() {
            let name = format!("fault {} ({} h{})", n + 1, f.fault.kind.name(), f.target);
            if f.converged.is_none() {
                v.push(format!("{name} did not converge"));
            }
            if f.after.failed > 0 {
                v.push(format!(
                    "{name}: {} requests failed after convergence: {:?}",
                    f.after.failed, f.after.errors
                ));
            }
            if !f.orphans.is_empty() {
                v.push(format!("{name}: orphaned tasks: {:?}", f.orphans));
            }
        }
        if !self.writes_lost.is_empty() {
            v.push(format!(
                "{} acknowledged writes lost: {:?}",
                self.writes_lost.len(),
                self.writes_lost
            ));
        }
        if !self.orphans.is_empty() {
            v.push(format!("orphaned tasks at the end: {:?}", self.orphans));
        }
        if !self.leaked.is_empty() {
            v.push(format!("kernel objects leaked: {:?}", self.leaked));
        }
        v.extend(self.errors.iter().cloned());
        v
    }

    /// The report as a table, seed first, so a run can be replayed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
        let _ = writeln!(
            out,
            "chaos run: seed {} (replay: MESH_CHAOS_SEED={}), {} faults, {} replicas, {:.0} s",
            self.seed,
            self.seed,
            self.faults.len(),
            self.replicas,
            self.duration.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "{:>3}  {:<18} {:<6} {:>6} {:>10} {:>12} {:>11} {:>8}",
            "#", "fault", "target", "held", "recovered", "failed:during", "after", "orphans"
        );
        let _ = writeln!(
            out,
            "{:>3}  {:<18} {:<6} {:>6} {:>10} {:>9}/{:<5} {:>7}/{:<4} {:>7}",
            "-", "steady", "-", "-", "-", "-", "-", self.steady.failed, self.steady.requests, "-"
        );
        for (n, f) in self.faults.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:>3}  {:<18} {:<6} {:>6} {:>10} {:>7}/{:<5} {:>7}/{:<4} {:>7}",
                n + 1,
                f.fault.kind.name(),
                format!("h{}", f.target),
                ms(Some(f.fault.hold)),
                if f.converged.is_some() {
                    ms(f.recovery())
                } else {
                    "NEVER".to_string()
                },
                f.during.failed,
                f.during.requests,
                f.after.failed,
                f.after.requests,
                f.orphans.len()
            );
        }
        let failed: usize = self.steady.failed
            + self
                .faults
                .iter()
                .map(|f| f.during.failed + f.after.failed)
                .sum::<usize>();
        let after: usize = self.faults.iter().map(|f| f.after.failed).sum();
        let slowest = self.faults.iter().filter_map(FaultOutcome::recovery).max();
        let _ = writeln!(
            out,
            "requests: {} sent, {failed} failed, {after} of them after convergence (must be 0)",
            self.requests
        );
        let _ = writeln!(out, "slowest recovery: {}", ms(slowest));
        let _ = writeln!(
            out,
            "writes: {} acknowledged, {} refused or timed out, {} acknowledged and lost (must be 0)",
            self.writes_acknowledged,
            self.writes_refused,
            self.writes_lost.len()
        );
        let _ = writeln!(out, "orphaned tasks: {} (must be 0)", self.orphans.len());
        let _ = writeln!(
            out,
            "kernel objects leaked: {} of the {} the service and its network made (must be 0)",
            self.leaked.len(),
            self.service_objects
        );
        for line in self.violations() {
            let _ = writeln!(out, "VIOLATION: {line}");
        }
        out
    }
}

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub faults: usize,
    pub replicas: usize,
    /// The window after each convergence in which no request may fail.
    pub quiet: Duration,
    /// How long a fault may take to converge before the run gives up.
    pub converge_timeout: Duration,
    /// Requests per second to each node's published port.
    pub rate_per_node: u32,
    /// A config written through each manager every this long.
    pub write_every: Duration,
}

impl Config {
    /// The shape `cargo xtask chaos` and the test share, with `faults`
    /// faults from `seed`.
    pub fn new(seed: u64, faults: usize) -> Config {
        Config {
            seed,
            faults,
            replicas: 4,
            quiet: Duration::from_secs(3),
            converge_timeout: Duration::from_secs(90),
            rate_per_node: 10,
            write_every: Duration::from_millis(400),
        }
    }
}

/// The seed from `MESH_CHAOS_SEED`, else one from the clock.
pub fn seed_from_env() -> u64 {
    std::env::var("MESH_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

/// Builds the swarm, runs the schedule under load and checks the end
/// state. Panics (with the agents' logs) only if the swarm cannot be set
/// up; everything found afterwards goes into the report.
pub fn run(config: &Config) -> Report {
    let started = Instant::now();
    let mut swarm = Swarm::new(CLIENT + 1);
    form(&swarm);
    let marker = format!("mesh-chaos-{}-{}", std::process::id(), config.seed);
    let baseline = warm_up_and_snapshot(&swarm);

    swarm.ok(0, &["network", "create", "--driver", "overlay", NETWORK]);
    let echo = binary("mesh-echo");
    let replicas = config.replicas.to_string();
    let publish = format!("{PORT}:80");
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            SERVICE,
            "--replicas",
            &replicas,
            "--network",
            NETWORK,
            "--publish",
            &publish,
            "--",
            echo.to_str().expect("reason: the build directory is UTF-8"),
            "--http",
            "80",
            &marker,
        ],
    );
    let mut report = Report {
        seed: config.seed,
        replicas: config.replicas,
        ..Report::default()
    };
    if let Err(why) = wait_converged(&swarm, config) {
        swarm.dump_logs();
        panic!("the service never settled before any fault: {why}");
    }
    // What the service and its network add to the kernels, so the final
    // comparison is known to see the kind of objects it looks for.
    report.service_objects = differences_from(&baseline, &snapshot_all(&swarm)).len();
    if report.service_objects == 0 {
        report
            .errors
            .push("the kernel snapshots saw nothing of the service: they could not see a leak".to_string());
    }

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Bounded in time however the run goes: the whole schedule's worst case.
    let bound = (config.converge_timeout + HOLD_MAX + config.quiet * 2) * (config.faults as u32 + 1);
    let loads = start_load(&swarm, config, epoch, bound, &stop);
    let writers = start_writers(&swarm, config, epoch, bound, &stop);

    std::thread::sleep(config.quiet);
    let steady_until = epoch.elapsed();
    let mut windows = Vec::new();
    for fault in schedule(config.seed, config.faults) {
        let outcome = inject(&mut swarm, config, epoch, fault, &marker);
        let gave_up = outcome.is_none();
        if let Some(o) = outcome {
            let stuck = o.0.converged.is_none();
            windows.push(o);
            if stuck {
                swarm.dump_logs();
                break;
            }
        }
        if gave_up {
            report.errors.push(format!("fault {fault:?} could not be injected"));
            break;
        }
    }

    stop.store(true, Ordering::Relaxed);
    let requests: Vec<Request> = loads.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    let writes: Vec<(String, bool)> = writers.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    report.requests = requests.len();
    report.steady = tally(&requests, Duration::ZERO, steady_until);
    for (mut outcome, quiet_until) in windows {
        outcome.during = tally(&requests, outcome.injected, outcome.converged.unwrap_or(quiet_until));
        if let Some(converged) = outcome.converged {
            outcome.after = tally(&requests, converged, quiet_until);
        }
        report.faults.push(outcome);
    }

    let acknowledged: Vec<String> = writes.iter().filter(|w| w.1).map(|w| w.0.clone()).collect();
    report.writes_acknowledged = acknowledged.len();
    report.writes_refused = writes.len() - acknowledged.len();
    match stored_configs(&swarm) {
        Ok(present) => report.writes_lost = lost_writes(&acknowledged, &present),
        Err(e) => report.errors.push(format!("reading the stored configs: {e}")),
    }
    match service_rows(&swarm) {
        Ok(rows) => {
            let live = live_tasks(&swarm);
            report.orphans = orphans(&rows, &live);
            report.errors.extend(missing_tasks(&rows, &live));
        }
        Err(e) => report.errors.push(e),
    }
    let (left, leaked) = remove_and_compare(&swarm, &baseline, &marker);
    report.orphans.extend(left);
    report.leaked = leaked;
    report.duration = started.elapsed();
    if !report.violations().is_empty() {
        swarm.dump_logs();
    }
    report
}

/// `swarm init` on h0; h1 and h2 join as managers, h3 and h4 as workers;
/// waits until every manager agrees on all five.
fn form(swarm: &Swarm) {
    swarm.init(&[]);
    for m in &MANAGERS[1..] {
        swarm.join(*m, 0, "manager");
    }
    for w in WORKERS {
        swarm.join(w, 0, "worker");
    }
    swarm.wait("5 nodes, 3 managers agreeing", Duration::from_secs(60), || {
        nodes_whole(swarm).is_ok()
    });
}

/// The node-lifetime objects (the task bridge, the masquerade table, the
/// tasks' cgroup) stay until a node leaves the swarm, by design; a global
/// service run once makes them on every node, so the snapshot taken after
/// it holds them and the end of the run must match it exactly.
fn warm_up_and_snapshot(swarm: &Swarm) -> Vec<BTreeSet<String>> {
    let echo = binary("mesh-echo");
    let marker = format!("mesh-chaos-warmup-{}", std::process::id());
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "warmup",
            "--mode",
            "global",
            "--",
            echo.to_str().expect("reason: the build directory is UTF-8"),
            "--http",
            "80",
            &marker,
        ],
    );
    swarm.wait("a warm-up task on every node", Duration::from_secs(60), || {
        service_rows_named(swarm, "warmup").is_ok_and(|rows| tasks_settled(&rows, NODES.len()).is_ok())
    });
    swarm.ok(0, &["service", "rm", "warmup"]);
    swarm.wait("the warm-up tasks gone", Duration::from_secs(60), || {
        processes_with(&marker).is_empty() && live_tasks(swarm).values().all(BTreeSet::is_empty)
    });
    // Settled: two snapshots in a row agree.
    let mut last = snapshot_all(swarm);
    swarm.wait("the hosts' kernels settled", Duration::from_secs(30), || {
        let now = snapshot_all(swarm);
        let same = now == last;
        last = now;
        same
    });
    last
}

/// One fault: injected, held, lifted, converged, then the quiet window;
/// (what it did, the end of its quiet window). `None`: it could not be
/// injected (no leader to kill, the drain refused).
fn inject(
    swarm: &mut Swarm,
    config: &Config,
    epoch: Instant,
    fault: Fault,
    marker: &str,
) -> Option<(FaultOutcome, Duration)> {
    let target = match fault.node {
        Some(n) => n,
        None => leader(swarm)?,
    };
    println!(
        "chaos: {} h{target} for {:.1} s",
        fault.kind.name(),
        fault.hold.as_secs_f64()
    );
    let injected = epoch.elapsed();
    match fault.kind {
        FaultKind::KillLeader | FaultKind::KillWorker => swarm.kill(target),
        FaultKind::PartitionManager => swarm.cluster.partition(target).ok()?,
        FaultKind::RestartAgent => {
            if !swarm.stop(target) {
                println!("chaos: h{target}'s agent did not stop on SIGTERM within 10 s; killed");
            }
        }
        FaultKind::DrainNode => {
            let node = format!("h{target}");
            let via = any_manager(swarm)?;
            let out = swarm.meshctl(via, &["node", "update", "--availability", "drain", &node]);
            if !out.status.success() {
                println!("chaos: drain refused: {}", String::from_utf8_lossy(&out.stderr));
                return None;
            }
        }
    }
    std::thread::sleep(fault.hold);
    let lifted = epoch.elapsed();
    match fault.kind {
        FaultKind::KillLeader | FaultKind::KillWorker | FaultKind::RestartAgent => swarm.start(target),
        FaultKind::PartitionManager => swarm.cluster.heal(target).ok()?,
        FaultKind::DrainNode => {
            let node = format!("h{target}");
            // Bounded retries: the write may meet an election.
            let back = (0..20).any(|_| {
                let ok = any_manager(swarm).is_some_and(|via| {
                    swarm
                        .meshctl(via, &["node", "update", "--availability", "active", &node])
                        .status
                        .success()
                });
                if !ok {
                    std::thread::sleep(Duration::from_millis(500));
                }
                ok
            });
            if !back {
                println!("chaos: h{target} could not be made active again");
            }
        }
    }
    let converged = match wait_converged(swarm, config) {
        Ok(()) => Some(epoch.elapsed()),
        Err(why) => {
            println!("chaos: {} h{target} did not converge: {why}", fault.kind.name());
            None
        }
    };
    println!(
        "chaos: {} h{target}: {}",
        fault.kind.name(),
        converged.map_or("stuck".to_string(), |c| format!(
            "converged {:.1} s after it was lifted",
            (c - lifted).as_secs_f64()
        ))
    );
    let mut orphaned = Vec::new();
    if converged.is_some() {
        std::thread::sleep(config.quiet);
        orphaned = match service_rows(swarm) {
            Ok(rows) => orphans(&rows, &live_tasks(swarm)),
            Err(e) => vec![e],
        };
        orphaned.extend(stray_processes(swarm, marker));
    }
    let quiet_until = epoch.elapsed();
    Some((
        FaultOutcome {
            fault,
            target,
            injected,
            lifted,
            converged,
            during: Tally::default(),
            after: Tally::default(),
            orphans: orphaned,
        },
        quiet_until,
    ))
}

/// Waits, bounded by the config's timeout, until the swarm is whole: the
/// managers agree on five Ready, Active nodes and one leader; the service
/// has settled; every node's tables match the running tasks.
fn wait_converged(swarm: &Swarm, config: &Config) -> Result<(), String> {
    let deadline = Instant::now() + config.converge_timeout;
    loop {
        let why = match converged(swarm, config.replicas) {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn converged(swarm: &Swarm, replicas: usize) -> Result<(), String> {
    nodes_whole(swarm)?;
    let rows = service_rows(swarm)?;
    tasks_settled(&rows, replicas)?;
    let task_nodes: Vec<Ipv4Addr> = rows
        .iter()
        .filter(|t| t.desired == "Running" && t.state == "Running")
        .filter_map(|t| t.host.map(host_address))
        .collect();
    for node in NODES {
        let backends = backends_on(swarm, node).ok_or(format!("h{node} has no routing-mesh program"))?;
        if !tables_agree(&backends, &task_nodes, host_address(node)) {
            return Err(format!("h{node}'s tables differ from the running tasks"));
        }
    }
    Ok(())
}

/// Every manager's `node ls`: five Ready and Active nodes, one Leader, the
/// other managers Reachable, the same on all three.
fn nodes_whole(swarm: &Swarm) -> Result<(), String> {
    let views: Vec<_> = MANAGERS.iter().map(|m| swarm.nodes(*m)).collect();
    for (m, view) in MANAGERS.iter().zip(&views) {
        let ready = view.iter().filter(|n| n.1 == "Ready" && n.2 == "Active").count();
        let leaders = view.iter().filter(|n| n.3 == "Leader").count();
        let reachable = view.iter().filter(|n| n.3 == "Reachable").count();
        if ready != NODES.len() || leaders != 1 || reachable != MANAGERS.len() - 1 {
            return Err(format!(
                "h{m} sees {ready} nodes ready and active, {leaders} leaders, {reachable} reachable managers"
            ));
        }
    }
    if views.windows(2).any(|w| w[0] != w[1]) {
        return Err("the managers' node lists differ".to_string());
    }
    Ok(())
}

/// The host of the manager that leads, as a manager that answers sees it.
fn leader(swarm: &Swarm) -> Option<usize> {
    MANAGERS.iter().find_map(|m| {
        swarm
            .nodes(*m)
            .iter()
            .find(|n| n.3 == "Leader")
            .and_then(|n| n.0.strip_prefix('h')?.parse().ok())
    })
}

/// A manager whose `node ls` answers.
fn any_manager(swarm: &Swarm) -> Option<usize> {
    MANAGERS.iter().copied().find(|m| !swarm.nodes(*m).is_empty())
}

fn service_rows(swarm: &Swarm) -> Result<Vec<TaskRow>, String> {
    service_rows_named(swarm, SERVICE)
}

/// `service ps NAME` through the first manager that answers.
fn service_rows_named(swarm: &Swarm, name: &str) -> Result<Vec<TaskRow>, String> {
    let mut last = String::new();
    for m in MANAGERS {
        let out = swarm.meshctl(m, &["service", "ps", name, "--format", "json"]);
        if out.status.success() {
            return task_rows(&String::from_utf8_lossy(&out.stdout));
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    Err(format!("no manager answers service ps: {last}"))
}

/// Per node, the tasks whose recorded process is alive (the PID file's
/// start time still matches, so a reused PID is not taken for a task).
fn live_tasks(swarm: &Swarm) -> BTreeMap<usize, BTreeSet<String>> {
    NODES
        .iter()
        .map(|n| (*n, live_under(&swarm.agents[*n].data_dir.join("tasks"))))
        .collect()
}

fn live_under(dir: &Path) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(entry.path().join("pid")) else {
            continue;
        };
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pid)), Some(Ok(start))) = (fields.next(), fields.next()) {
            if u32::try_from(pid).is_ok_and(|pid| start_time(pid) == Some(start)) {
                live.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    live
}

/// The service's processes that no node's PID files account for.
fn stray_processes(swarm: &Swarm, marker: &str) -> Vec<String> {
    let recorded: BTreeSet<u32> = NODES
        .iter()
        .flat_map(|n| {
            let dir = swarm.agents[*n].data_dir.join("tasks");
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
                .filter_map(|t| t.split_whitespace().next()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    processes_with(marker)
        .into_iter()
        .filter(|pid| !recorded.contains(pid) && *pid != std::process::id())
        .map(|pid| format!("process {pid} runs the service's command, recorded by no node"))
        .collect()
}

/// The names of the stored configs, once the managers' stores agree.
fn stored_configs(swarm: &Swarm) -> Result<BTreeSet<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut agreed = false;
    while !agreed && Instant::now() < deadline {
        let applied = swarm.applied(0).unwrap_or(0);
        agreed = swarm.stores_agree(&MANAGERS, applied);
        if !agreed {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if !agreed {
        return Err("the managers' stores never agreed".to_string());
    }
    let mut names = None;
    for m in MANAGERS {
        let out = swarm.meshctl(m, &["config", "ls", "--format", "json"]);
        if !out.status.success() {
            return Err(format!("config ls on h{m}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let list: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("config ls on h{m}: {e}"))?;
        let here: BTreeSet<String> = list
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        match &names {
            None => names = Some(here),
            Some(first) if *first != here => return Err(format!("h{m} lists other configs than h0")),
            Some(_) => {}
        }
    }
    names.ok_or("no manager".to_string())
}

/// One thread per node asking its published port from the client at a
/// steady rate until `stop`, bounded in time by `bound`.
fn start_load(
    swarm: &Swarm,
    config: &Config,
    epoch: Instant,
    bound: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Vec<Request>>> {
    let every = Duration::from_secs(1) / config.rate_per_node;
    NODES
        .iter()
        .map(|&node| {
            let client = NetNs::open(swarm.cluster.host(CLIENT).netns().name()).expect("the client's namespace");
            let stop = stop.clone();
            std::thread::spawn(move || {
                client
                    .run(|| {
                        let to = SocketAddr::from((host_address(node), PORT));
                        let mut requests = Vec::new();
                        while !stop.load(Ordering::Relaxed) && epoch.elapsed() < bound {
                            let at = epoch.elapsed();
                            let error = http_get(to).err();
                            requests.push(Request { at, node, error });
                            let next = at + every;
                            if let Some(wait) = next.checked_sub(epoch.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                        requests
                    })
                    .unwrap_or_default()
            })
        })
        .collect()
}

/// One thread per manager storing numbered configs through it (`meshctl
/// config create`), each recorded as acknowledged or not, until `stop`.
fn start_writers(
    swarm: &Swarm,
    config: &Config,
    epoch: Instant,
    bound: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Vec<(String, bool)>>> {
    let content = std::env::temp_dir().join(format!("mesh-chaos-config-{}", std::process::id()));
    std::fs::write(&content, "chaos\n").expect("write the config content");
    MANAGERS
        .iter()
        .map(|&m| {
            let ns = NetNs::open(swarm.cluster.host(m).netns().name()).expect("the manager's namespace");
            let socket: PathBuf = swarm.agents[m].socket.clone();
            let content = content.clone();
            let stop = stop.clone();
            let every = config.write_every;
            std::thread::spawn(move || {
                let mut writes = Vec::new();
                while !stop.load(Ordering::Relaxed) && epoch.elapsed() < bound {
                    let name = format!("chaos-h{m}-{}", writes.len());
                    let mut cmd = Command::new(binary("meshctl"));
                    cmd.arg("--socket")
                        .arg(&socket)
                        .args(["config", "create", &name])
                        .arg(&content);
                    let ok = Process::output_in(&ns, cmd, Duration::from_secs(20)).is_ok_and(|o| o.status.success());
                    writes.push((name, ok));
                    std::thread::sleep(every);
                }
                writes
            })
        })
        .collect()
}

/// Removes the service and its network, waits (bounded) for the tasks to
/// stop and the hosts' kernels to return to `baseline`; (processes left,
/// kernel differences).
fn remove_and_compare(swarm: &Swarm, baseline: &[BTreeSet<String>], marker: &str) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let removed = (0..50).any(|_| {
        let ok = any_manager(swarm).is_some_and(|m| swarm.meshctl(m, &["service", "rm", SERVICE]).status.success());
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    if !removed {
        problems.push("the service could not be removed".to_string());
    }
    // Refused while a task still uses it: retried, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !any_manager(swarm).is_some_and(|m| swarm.meshctl(m, &["network", "rm", NETWORK]).status.success()) {
        if Instant::now() > deadline {
            problems.push("the network could not be removed".to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = processes_with(marker)
            .into_iter()
            .filter(|pid| *pid != std::process::id())
            .map(|pid| format!("process {pid} still runs the removed service's command"))
            .collect();
        let leaked = differences_from(baseline, &snapshot_all(swarm));
        if (left.is_empty() && leaked.is_empty()) || Instant::now() > deadline {
            let mut leaked = leaked;
            leaked.extend(problems);
            return (left, leaked);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every node's differences between two snapshots of them all.
fn differences_from(before: &[BTreeSet<String>], after: &[BTreeSet<String>]) -> Vec<String> {
    NODES
        .iter()
        .zip(before.iter().zip(after))
        .flat_map(|(host, (before, after))| differences(*host, before, after))
        .collect()
}

fn snapshot_all(swarm: &Swarm) -> Vec<BTreeSet<String>> {
    NODES.iter().map(|n| kernel_objects(swarm, *n)).collect()
}

/// A host's kernel objects as comparable lines: links (kind, XDP), IPv4
/// and global IPv6 addresses, routes of every table, permanent neighbours
/// and static forwarding entries, the nftables ruleset, TC qdiscs and
/// filters and tcx programs on every link, and under the agent's data
/// directory its pinned BPF objects and its mounts (task namespaces,
/// bpffs, staged files). Observed with `ip`, `bridge`, `nft`, `tc`.
pub fn kernel_objects(swarm: &Swarm, host: usize) -> BTreeSet<String> {
    let mut objects = BTreeSet::new();
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let program = args[0];
        let mut cmd = Command::new(program);
        cmd.args(&args[1..]);
        swarm
            .cluster
            .host(host)
            .output(cmd, Duration::from_secs(10))
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
    let mut links = Vec::new();
    for l in json(&["ip", "-j", "-d", "link", "show"]) {
        let name = text(&l, "ifname");
        let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("-");
        let xdp = if l.get("xdp").is_some() { " xdp" } else { "" };
        objects.insert(format!("link {name} {kind}{xdp}"));
        links.push(name);
    }
    for l in json(&["ip", "-j", "addr", "show"]) {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let scope = text(a, "scope");
            if scope == "link" && text(a, "family") == "inet6" {
                continue; // fe80::/64 follows the link, which is compared
            }
            objects.insert(format!(
                "address {} {}/{}",
                text(&l, "ifname"),
                text(a, "local"),
                a["prefixlen"]
            ));
        }
    }
    for family in ["-4", "-6"] {
        for r in json(&["ip", "-j", family, "route", "show", "table", "all"]) {
            if text(&r, "dst").starts_with("fe80:") || text(&r, "dst").starts_with("ff00:") {
                continue; // per-link IPv6 routes follow the link
            }
            objects.insert(format!(
                "route {} {} dev {} table {} {}",
                text(&r, "type"),
                text(&r, "dst"),
                text(&r, "dev"),
                r["table"].as_str().unwrap_or("main"),
                text(&r, "gateway")
            ));
        }
    }
    for n in json(&["ip", "-j", "neigh", "show", "nud", "permanent"]) {
        objects.insert(format!(
            "neighbour {} {} {}",
            text(&n, "dev"),
            text(&n, "dst"),
            text(&n, "lladdr")
        ));
    }
    for f in json(&["bridge", "-j", "fdb", "show"]) {
        let state = text(&f, "state");
        if state == "permanent" || state == "static" {
            objects.insert(format!(
                "fdb {} {} {} {}",
                text(&f, "ifname"),
                text(&f, "mac"),
                text(&f, "dst"),
                state
            ));
        }
    }
    let mut nft = Command::new("nft");
    nft.args(["list", "ruleset"]);
    if let Ok(out) = swarm.cluster.host(host).output(nft, Duration::from_secs(10)) {
        for (n, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
            objects.insert(format!("nft {n:04} {}", line.trim()));
        }
    }
    for link in &links {
        for q in json(&["tc", "-j", "qdisc", "show", "dev", link]) {
            objects.insert(format!("qdisc {link} {} {}", text(&q, "kind"), text(&q, "handle")));
        }
        for dir in ["ingress", "egress"] {
            for f in json(&["tc", "-j", "filter", "show", "dev", link, dir]) {
                objects.insert(format!("tc filter {link} {dir} {} {}", text(&f, "kind"), f["options"]));
            }
        }
        for (dir, attach) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
            let names: Vec<String> = swarm.cluster.host(host).run(|| {
                SchedClassifier::query_tcx(link, attach)
                    .map(|(_, programs)| {
                        programs
                            .iter()
                            .map(|p| p.name_as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            for name in names {
                objects.insert(format!("tcx {link} {dir} {name}"));
            }
        }
    }
    let data_dir = &swarm.agents[host].data_dir;
    for pin in files_under(&data_dir.join("bpf")) {
        objects.insert(format!("pinned {pin}"));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        if let Ok(rest) = Path::new(point).strip_prefix(data_dir) {
            let fstype = line
                .split(" - ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .unwrap_or("?");
            objects.insert(format!("mount {} {fstype}", rest.display()));
        }
    }
    objects
}

/// Paths under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().filter_map(Result::ok) {
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_the_same_for_the_same_seed_and_differs_for_another() {
        assert_eq!(schedule(7, 15), schedule(7, 15));
        assert_ne!(schedule(7, 15), schedule(8, 15));
        assert_eq!(schedule(7, 15).len(), 15);
        assert!(schedule(7, 0).is_empty());
    }

    #[test]
    fn every_kind_comes_once_a_round_so_five_faults_cover_them_all() {
        for seed in 0..200 {
            let faults = schedule(seed, 12);
            for round in faults.chunks(5).filter(|c| c.len() == 5) {
                let kinds: BTreeSet<FaultKind> = round.iter().map(|f| f.kind).collect();
                assert_eq!(kinds.len(), 5, "seed {seed}: {round:?}");
            }
        }
        let first: BTreeSet<Vec<FaultKind>> = (0..50)
            .map(|s| schedule(s, 5).iter().map(|f| f.kind).collect())
            .collect();
        assert!(first.len() > 10, "the order depends on the seed");
    }

    #[test]
    fn targets_fit_their_kind_and_holds_stay_in_bounds() {
        for seed in 0..200 {
            for f in schedule(seed, 10) {
                match f.kind {
                    FaultKind::KillLeader => assert_eq!(f.node, None),
                    FaultKind::KillWorker => assert!(WORKERS.contains(&f.node.unwrap())),
                    FaultKind::PartitionManager => assert!(MANAGERS.contains(&f.node.unwrap())),
                    FaultKind::RestartAgent | FaultKind::DrainNode => {
                        assert!(NODES.contains(&f.node.unwrap()))
                    }
                }
                assert!(f.hold >= HOLD_MIN && f.hold <= HOLD_MAX, "{f:?}");
                assert_eq!(f.hold.as_millis() % 500, 0);
                assert!(f.node != Some(CLIENT));
            }
        }
    }

    fn request(at_ms: u64, ok: bool) -> Request {
        Request {
            at: Duration::from_millis(at_ms),
            node: 1,
            error: (!ok).then(|| "refused".to_string()),
        }
    }

    #[test]
    fn requests_count_in_the_window_they_started_in() {
        let requests = vec![
            request(100, true),
            request(900, false),
            request(1000, false),
            request(1500, true),
            request(2000, false),
        ];
        let during = tally(&requests, Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!((during.requests, during.failed), (2, 1));
        assert_eq!(during.errors, vec!["0.9s h1: refused".to_string()]);
        let after = tally(&requests, Duration::from_millis(1000), Duration::from_millis(2000));
        assert_eq!((after.requests, after.failed), (2, 1));
    }

    fn backend(node: Ipv4Addr, local: bool) -> Backend {
        Backend {
            node: u32::from_ne_bytes(node.octets()),
            local: if local { 1 } else { 0 },
            route: 0,
        }
    }

    #[test]
    fn tables_agree_only_with_one_backend_per_running_task_and_local_ones_for_the_node_itself() {
        let (a, b) = (host_address(0), host_address(1));
        let vip = Backend {
            node: 0,
            local: 7,
            route: 0,
        };
        let good = [backend(a, true), backend(b, false), backend(b, false), vip];
        assert!(tables_agree(&good, &[b, a, b], a));
        assert!(!tables_agree(&good, &[a, b], a), "a task too many in the tables");
        assert!(!tables_agree(&good[..2], &[a, b, b], a), "a task missing");
        assert!(
            !tables_agree(&good, &[a, b, b], b),
            "seen from b, a's task is not local"
        );
    }

    fn row(task: &str, host: usize, state: &str, desired: &str) -> TaskRow {
        TaskRow {
            task: task.to_string(),
            host: Some(host),
            state: state.to_string(),
            desired: desired.to_string(),
        }
    }

    #[test]
    fn a_service_settles_when_its_replicas_run_and_nothing_else_is_stopping() {
        let mut rows = vec![
            row("t1", 0, "Running", "Running"),
            row("t2", 1, "Running", "Running"),
            row("t0", 2, "Shutdown", "Shutdown"),
        ];
        assert_eq!(tasks_settled(&rows, 2), Ok(()));
        assert!(tasks_settled(&rows, 3).is_err());
        rows.push(row("t3", 3, "Running", "Shutdown"));
        assert!(tasks_settled(&rows, 2).unwrap_err().contains("t3"));
    }

    #[test]
    fn a_live_task_not_assigned_to_its_node_is_an_orphan() {
        let rows = vec![
            row("t1", 0, "Running", "Running"),
            row("t2", 1, "Running", "Shutdown"),
            row("t3", 2, "Running", "Running"),
        ];
        let live = BTreeMap::from([
            (0, BTreeSet::from(["t1".to_string()])),
            (1, BTreeSet::from(["t2".to_string()])),
            (4, BTreeSet::from(["t3".to_string()])),
        ]);
        assert_eq!(
            orphans(&rows, &live),
            vec![
                "h1 runs task t2, which the cluster does not assign to it".to_string(),
                "h4 runs task t3, which the cluster does not assign to it".to_string(),
            ]
        );
    }

    #[test]
    fn a_task_the_store_runs_but_its_node_does_not_is_missing() {
        let rows = vec![
            row("t1", 0, "Running", "Running"),
            row("t2", 1, "Running", "Running"),
            row("t3", 2, "Shutdown", "Shutdown"),
        ];
        let live = BTreeMap::from([(0, BTreeSet::from(["t1".to_string()])), (1, BTreeSet::new())]);
        assert_eq!(
            missing_tasks(&rows, &live),
            vec!["the store says h1 runs task t2, which h1 does not run".to_string()]
        );
    }

    #[test]
    fn task_rows_come_from_service_ps_json() {
        let json = r#"[{"task":{"id":1,"state":"Running","desired":"Running"},"node_hostname":"h3"},
                       {"task":{"id":2,"state":"Pending","desired":"Running"},"node_hostname":null}]"#;
        let rows = task_rows(json).unwrap();
        assert_eq!(rows[0].host, Some(3));
        assert_eq!(rows[0].task, task_dir_name(1));
        assert_eq!(rows[1].host, None);
        assert_eq!(rows[1].state, "Pending");
        assert!(task_rows("not json").is_err());
    }

    #[test]
    fn differences_name_what_was_left_and_what_went_missing() {
        let before = BTreeSet::from(["link eth0 veth".to_string(), "link mesh_gwbridge bridge".to_string()]);
        let after = BTreeSet::from(["link eth0 veth".to_string(), "link mbr-4096 bridge".to_string()]);
        assert_eq!(
            differences(2, &before, &after),
            vec![
                "h2 + link mbr-4096 bridge".to_string(),
                "h2 - link mesh_gwbridge bridge".to_string()
            ]
        );
        assert!(differences(2, &before, &before).is_empty());
    }

    #[test]
    fn only_acknowledged_writes_missing_from_the_store_are_lost() {
        let acknowledged = vec!["a".to_string(), "b".to_string()];
        let present = BTreeSet::from(["a".to_string(), "c".to_string()]);
        assert_eq!(lost_writes(&acknowledged, &present), vec!["b".to_string()]);
    }

    fn outcome(failed_after: usize, converged: bool) -> FaultOutcome {
        FaultOutcome {
            fault: Fault {
                kind: FaultKind::DrainNode,
                node: Some(3),
                hold: Duration::from_secs(2),
            },
            target: 3,
            injected: Duration::from_secs(10),
            lifted: Duration::from_secs(12),
            converged: converged.then_some(Duration::from_millis(14_500)),
            during: Tally {
                requests: 50,
                failed: 4,
                errors: vec![],
            },
            after: Tally {
                requests: 30,
                failed: failed_after,
                errors: vec![],
            },
            orphans: vec![],
        }
    }

    #[test]
    fn failures_while_converging_are_allowed_but_not_after() {
        let mut report = Report {
            seed: 42,
            faults: vec![outcome(0, true)],
            ..Report::default()
        };
        assert!(report.violations().is_empty(), "{:?}", report.violations());
        assert_eq!(report.faults[0].recovery(), Some(Duration::from_millis(2500)));
        let text = report.render();
        assert!(text.contains("MESH_CHAOS_SEED=42"), "{text}");
        assert!(text.contains("drain node"), "{text}");
        assert!(text.contains("2.5 s"), "{text}");

        report.faults.push(outcome(1, true));
        report.faults.push(outcome(0, false));
        report.writes_lost = vec!["chaos-h0-3".to_string()];
        report.leaked = vec!["h1 + link mbr-4096 bridge".to_string()];
        report.orphans = vec!["h1 runs task t".to_string()];
        let v = report.violations();
        assert_eq!(v.len(), 5, "{v:?}");
        assert!(report.render().contains("NEVER"));
        assert!(report.render().contains("VIOLATION"));
    }
}
