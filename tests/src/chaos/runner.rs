//! The chaos run over real agents: the swarm, the load, the writers, the
//! faults, the waits for convergence and the checks at the end.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mesh_agent::agent::net::netns::NetNs;

use super::{
    log_findings, lost_writes, missing_tasks, new_tasks, observe, orphans, schedule, tables_agree, tally, task_rows,
    tasks_settled, Config, Fault, FaultKind, FaultOutcome, Report, Request, Tally, TaskRow, CLIENT, HOLD_MAX, MANAGERS,
    NETWORK, NODES, PORT, SERVICE, WORKERS,
};
use crate::{
    cluster::host_address,
    mesh::{backends_on, http_get},
    process::{processes_with, Process},
    swarm::{binary, Swarm},
};

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
    report.service_objects = observe::differences_from(&baseline, &observe::snapshot_all(&swarm)).len();
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
        let Some((outcome, quiet_until)) = inject(&mut swarm, config, epoch, fault, &marker) else {
            report.errors.push(format!("fault {fault:?} could not be injected"));
            break;
        };
        let stuck = outcome.converged.is_none();
        windows.push((outcome, quiet_until));
        if stuck {
            swarm.dump_logs();
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
            let live = observe::live_tasks(&swarm);
            report.orphans = orphans(&rows, &live);
            report.errors.extend(missing_tasks(&rows, &live));
        }
        Err(e) => report.errors.push(e),
    }
    let (left, leaked) = remove_and_compare(&swarm, &baseline, &marker);
    report.orphans.extend(left);
    report.leaked = leaked;
    for (host, agent) in swarm.agents.iter().enumerate() {
        let (panics, errors) = log_findings(&std::fs::read_to_string(&agent.log).unwrap_or_default());
        report
            .panics
            .extend(panics.into_iter().map(|p| format!("h{host}: {p}")));
        report
            .agent_errors
            .extend(errors.into_iter().map(|e| format!("h{host}: {e}")));
    }
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
        processes_with(&marker).is_empty() && observe::live_tasks(swarm).values().all(BTreeSet::is_empty)
    });
    // Settled: two snapshots in a row agree.
    let mut last = observe::snapshot_all(swarm);
    swarm.wait("the hosts' kernels settled", Duration::from_secs(30), || {
        let now = observe::snapshot_all(swarm);
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
    let before = service_rows(swarm).unwrap_or_default();
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
    let mut started = 0;
    if converged.is_some() {
        std::thread::sleep(config.quiet);
        orphaned = match service_rows(swarm) {
            Ok(rows) => {
                started = new_tasks(&before, &rows);
                orphans(&rows, &observe::live_tasks(swarm))
            }
            Err(e) => vec![e],
        };
        orphaned.extend(observe::stray_processes(swarm, marker));
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
            moved: started,
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
    let most = usize::try_from(bound.as_secs() * u64::from(config.rate_per_node)).unwrap_or(usize::MAX);
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
                        // Bounded in time and, through the pacing, in count.
                        while !stop.load(Ordering::Relaxed) && epoch.elapsed() < bound && requests.len() < most {
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
                let most = (bound.as_millis() / every.as_millis().max(1)) as usize;
                while !stop.load(Ordering::Relaxed) && epoch.elapsed() < bound && writes.len() < most {
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
        let leaked = observe::differences_from(baseline, &observe::snapshot_all(swarm));
        if (left.is_empty() && leaked.is_empty()) || Instant::now() > deadline {
            let mut leaked = leaked;
            leaked.extend(problems);
            return (left, leaked);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
