//! Chaos under load: five nodes (three managers, two workers)
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
//! over plain data, unit-tested below; [`run`] (runner.rs) drives the real
//! agents and observe.rs reads the hosts.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    time::Duration,
};

use mesh_agent::agent::tasks::supervisor::task_dir_name;
use mesh_common::lb::Backend;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

mod observe;
mod runner;

pub use observe::kernel_objects;
pub use runner::run;

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
pub const HOLD_MAX: Duration = Duration::from_millis(10_000);

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

/// How many tasks run in `after` that did not in `before`: the tasks a
/// fault made the cluster start elsewhere.
pub fn new_tasks(before: &[TaskRow], after: &[TaskRow]) -> usize {
    let running = |rows: &[TaskRow]| -> BTreeSet<String> {
        rows.iter()
            .filter(|t| t.desired == "Running" && t.state == "Running")
            .map(|t| t.task.clone())
            .collect()
    };
    running(after).difference(&running(before)).count()
}

/// What an agent's log says went badly: the panics (with the line after,
/// which names the place), and each distinct ERROR message once, its
/// timestamp left out.
pub fn log_findings(text: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut panics = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            panics.push(format!("{line} {}", lines.get(n + 1).unwrap_or(&"")));
        }
        if let Some((head, message)) = line.split_once("] ") {
            if head.contains(" ERROR ") {
                let target = head.rsplit(' ').next().unwrap_or_default();
                let error = format!("{target}: {message}");
                if !errors.contains(&error) {
                    errors.push(error);
                }
            }
        }
    }
    (panics, errors)
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
    /// Tasks it made the cluster start (on other nodes, or anew).
    pub moved: usize,
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
    /// Agents that panicked: "hN: the panic".
    pub panics: Vec<String>,
    /// Distinct ERROR lines of the agents' logs: "hN: target: message".
    pub agent_errors: Vec<String>,
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
        if !self.panics.is_empty() {
            v.push(format!("agents panicked: {:?}", self.panics));
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
        let row = |out: &mut String, cells: [String; 9]| {
            let [n, kind, target, held, recovered, during, after, moved, orphans] = cells;
            let _ = writeln!(
                out,
                "{n:>3}  {kind:<18} {target:<6} {held:>6} {recovered:>9} {during:>14} {after:>14} {moved:>6} {orphans:>7}"
            );
        };
        let ratio = |t: &Tally| format!("{}/{}", t.failed, t.requests);
        row(
            &mut out,
            [
                "#",
                "fault",
                "target",
                "held",
                "recovery",
                "failed:during",
                "after",
                "moved",
                "orphans",
            ]
            .map(String::from),
        );
        row(
            &mut out,
            [
                "-".into(),
                "(before any)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                ratio(&self.steady),
                "-".into(),
                "-".into(),
            ],
        );
        for (n, f) in self.faults.iter().enumerate() {
            let failures = f.during.errors.iter().chain(&f.after.errors);
            let notes: Vec<String> = failures.map(|e| format!("       first failures: {e}")).collect();
            row(
                &mut out,
                [
                    (n + 1).to_string(),
                    f.fault.kind.name().into(),
                    format!("h{}", f.target),
                    ms(Some(f.fault.hold)),
                    if f.converged.is_some() {
                        ms(f.recovery())
                    } else {
                        "NEVER".into()
                    },
                    ratio(&f.during),
                    ratio(&f.after),
                    f.moved.to_string(),
                    f.orphans.len().to_string(),
                ],
            );
            for note in notes {
                let _ = writeln!(out, "{note}");
            }
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
        let _ = writeln!(
            out,
            "agents: {} panics, {} distinct ERROR log lines",
            self.panics.len(),
            self.agent_errors.len()
        );
        for line in &self.agent_errors {
            let _ = writeln!(out, "  {line}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::host_address;

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
    fn tasks_running_after_a_fault_that_did_not_before_were_moved() {
        let before = vec![row("t1", 0, "Running", "Running"), row("t2", 1, "Running", "Running")];
        let after = vec![
            row("t1", 0, "Running", "Running"),
            row("t2", 1, "Shutdown", "Shutdown"),
            row("t3", 2, "Running", "Running"),
        ];
        assert_eq!(new_tasks(&before, &after), 1);
        assert_eq!(new_tasks(&before, &before), 0);
    }

    #[test]
    fn an_agent_log_gives_its_panics_and_each_error_once() {
        let log = "[2026-01-01T00:00:01Z INFO  mesh_agent::node] fine\n\
                   [2026-01-01T00:00:02Z ERROR mesh_agent::node] heartbeat: refused\n\
                   [2026-01-01T00:00:03Z ERROR mesh_agent::node] heartbeat: refused\n\
                   thread 'tokio-runtime-worker' panicked at mesh-agent/src/x.rs:1:2:\n\
                   boom\n";
        let (panics, errors) = log_findings(log);
        assert_eq!(errors, vec!["mesh_agent::node: heartbeat: refused".to_string()]);
        assert_eq!(panics.len(), 1);
        assert!(panics[0].ends_with("x.rs:1:2: boom"), "{panics:?}");
        assert_eq!(log_findings("[t INFO  a] ERROR in a message"), (vec![], vec![]));
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
            moved: 1,
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
        report.panics = vec!["h2: panicked at x.rs".to_string()];
        report.agent_errors = vec!["h2: a: refused".to_string()];
        let v = report.violations();
        assert_eq!(v.len(), 6, "{v:?}");
        assert!(report.render().contains("NEVER"));
        assert!(report.render().contains("VIOLATION"));
    }
}
