//! `cargo xtask bench scale`: the figures at scale, by simulation.
//!
//! A real swarm of 3 managers (release `mesh-agent`s in network
//! namespaces, drained so they run no task) and, in a fourth namespace,
//! one process holding N simulated nodes ([`mesh_tests::sim`]): each joins
//! with the worker token, gets its own certificate and keeps its own
//! mutual-TLS session (heartbeats, the assignments long poll, task
//! reports). Only the nodes' runtimes are simulated: a task is reported
//! Running the moment it is assigned. Everything shares this machine's two
//! cores, so the figures are a floor on what real managers would do.
//!
//! Per N it reports: join time (p50/p99) and the whole fleet's; the
//! managers' CPU and heartbeats/s, idle and with the full load; the time
//! from `service create --replicas 10000` to 10,000 tasks reported
//! Running; the time for the rest of the load (SERVICES services,
//! TASKS tasks in all, on 10 overlay networks, every tenth service
//! publishing a port); the Raft log, the snapshot and the store file; the
//! time for a new manager to catch up (snapshot chunks of 1 MiB); the
//! leader's memory per node session; and what each node's kernel would
//! hold (overlay objects, routing-mesh map entries, DNS records).
//!
//! `--nodes 100,1000,5000 --services 1000 --tasks 50000 --sample 500` (the
//! defaults; `--sample`: at most this many nodes, spread over the fleet,
//! have their dataplane sized).

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use mesh_tests::{
    require_root,
    sim::{data_path_address, DataplaneSize, SimNode, Stats},
    swarm::Swarm,
};

/// Hosts: three managers, the simulator, a manager that joins last.
const SIM_HOST: usize = 3;
const NEW_MANAGER: usize = 4;
const BULK_TASKS: usize = 10_000;
/// Tries per simulated node's join.
const JOIN_ATTEMPTS: usize = 10;
const NETWORKS: usize = 10;
/// Raft timing: Swarm's own defaults (a 1 s heartbeat, a 10 s election).
/// Managers sharing two cores with thousands of simulated sessions and the
/// simulator are starved for seconds at a time; at 200 ms / 2 s the 1,000
/// node run lost its leader a hundred times, and each change of leader
/// gave every node a new grace period and every write a retry.
/// The simulated nodes all come from one address, as nodes behind one NAT
/// would: the managers let that many connect at once.
const MANAGER_FLAGS: &[&str] = &[
    "--raft-heartbeat",
    "1s",
    "--raft-election-timeout",
    "10s",
    "--max-unauthenticated-per-source",
    "100000",
];

struct Args {
    nodes: Vec<usize>,
    services: usize,
    tasks: usize,
    /// At most this many nodes have their dataplane sized (evenly spread
    /// over the fleet): sizing one is a whole assignments reply and the
    /// agent's planners, about a second of the simulator's time at 1,000.
    sample: usize,
}

fn args() -> Args {
    let mut a = Args {
        nodes: vec![100, 1000, 5000],
        services: 1000,
        tasks: 50_000,
        sample: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => {
                a.nodes = value
                    .split(',')
                    .map(|v| v.parse().expect("--nodes: numbers separated by commas"))
                    .collect()
            }
            "--services" => a.services = value.parse().expect("--services: a number"),
            "--tasks" => a.tasks = value.parse().expect("--tasks: a number"),
            "--sample" => a.sample = value.parse().expect("--sample: a number"),
            other => panic!("unknown flag {other}: --nodes N,N --services N --tasks N --sample N"),
        }
    }
    assert!(a.services >= 2, "--services must be at least 2");
    assert!(a.sample >= 1, "--sample must be at least 1");
    assert!(a.tasks > BULK_TASKS, "--tasks must exceed {BULK_TASKS}");
    a
}

/// One scale's figures.
#[derive(Debug, Default)]
struct Report {
    nodes: usize,
    join_p50_ms: f64,
    join_p99_ms: f64,
    fleet_join_s: f64,
    idle: Load,
    bulk_s: f64,
    rest_s: f64,
    loaded: Load,
    log_entries: u64,
    snapshot_mib: f64,
    store_mib: f64,
    catch_up_s: f64,
    session_kib: f64,
    leader_rss_mib: f64,
    per_node: DataplaneSize,
    per_node_max: DataplaneSize,
    assignment_kib: f64,
    /// Nodes whose dataplane was sized.
    sized: usize,
}

/// The managers' work over a window.
#[derive(Debug, Default, Clone, Copy)]
struct Load {
    /// CPU of the three manager processes, in cores.
    cpu: f64,
    heartbeats_per_s: f64,
}

fn main() {
    require_root();
    raise_open_files();
    let args = args();
    let mut reports = Vec::new();
    for &n in &args.nodes {
        reports.push(run(n, args.services, args.tasks, args.sample));
    }
    println!(
        "\n== scale by simulation ({} services, {} tasks; 3 real managers; simulated nodes)",
        args.services, args.tasks
    );
    println!("| nodes | join p50/p99 ms | all joined s | idle mgr CPU, hb/s | 10k tasks s | rest s | loaded mgr CPU, hb/s | log entries | snapshot MiB | store MiB | new manager s | KiB/session | leader RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {:.1} / {:.1} | {:.1} | {:.2}, {:.0} | {:.1} | {:.1} | {:.2}, {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            r.nodes,
            r.join_p50_ms,
            r.join_p99_ms,
            r.fleet_join_s,
            r.idle.cpu,
            r.idle.heartbeats_per_s,
            r.bulk_s,
            r.rest_s,
            r.loaded.cpu,
            r.loaded.heartbeats_per_s,
            r.log_entries,
            r.snapshot_mib,
            r.store_mib,
            r.catch_up_s,
            r.session_kib,
            r.leader_rss_mib,
        );
    }
    println!("\n== per node: what its kernel would hold (mean / max over the nodes sized)");
    println!("| nodes | sized | tasks | overlay objects | mesh map entries | DNS records | assignments KiB |");
    println!("|---|---|---|---|---|---|---|");
    for r in &reports {
        let (m, x) = (r.per_node, r.per_node_max);
        println!(
            "| {} | {} | {} / {} | {} / {} | {} / {} | {} / {} | {:.1} |",
            r.nodes,
            r.sized,
            m.tasks,
            x.tasks,
            m.overlay_objects,
            x.overlay_objects,
            m.mesh_entries,
            x.mesh_entries,
            m.dns_records,
            x.dns_records,
            r.assignment_kib
        );
    }
}

fn run(n: usize, services: usize, tasks: usize, sample: usize) -> Report {
    eprintln!("\n== {n} simulated nodes");
    let mut report = Report {
        nodes: n,
        ..Default::default()
    };
    let swarm = Swarm::with_flags(5, MANAGER_FLAGS);
    let addr = |i: usize| swarm.cluster.host(i).address().to_string();
    swarm.ok(
        0,
        &[
            "swarm",
            "init",
            "--advertise-addr",
            &addr(0),
            "--dispatcher-heartbeat",
            "5s",
        ],
    );
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.wait("3 managers ready", Duration::from_secs(60), || swarm.ready(0) == 3);
    for m in 0..3 {
        swarm.ok(0, &["node", "update", "--availability", "drain", &format!("h{m}")]);
    }
    let token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]).trim().to_string();
    let managers: Vec<String> = (0..3).map(|i| format!("{}:2377", addr(i))).collect();
    let pids: Vec<u32> = (0..3).map(|i| swarm.pid(i).expect("a running manager")).collect();
    let leader = leader_index(&swarm);
    let rss_before = rss_kib(pids[leader]);

    // The simulator: a runtime whose threads live in the simulator's
    // namespace, so every socket the nodes open is made there.
    let runtime = swarm.cluster.host(SIM_HOST).run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    });
    // The fleet's heartbeats, on a runtime of their own (see `SimNode`).
    let beats = swarm.cluster.host(SIM_HOST).run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sim-heartbeats")
            .enable_all()
            .build()
            .expect("a runtime")
    });
    let beats_handle = beats.handle().clone();
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sim_ip: std::net::IpAddr = addr(SIM_HOST).parse().expect("an address");

    // Joins, 16 at a time (a fleet being provisioned), each node's session
    // started as soon as it joined.
    let t0 = Instant::now();
    let joined = runtime
        .block_on(runtime.spawn({
            let (token, managers, stats, stop) = (token.clone(), managers.clone(), stats.clone(), stop.clone());
            let beats = beats_handle.clone();
            async move {
                let limit = Arc::new(tokio::sync::Semaphore::new(16));
                let mut handles = Vec::new();
                for i in 0..n {
                    let permit = limit.clone().acquire_owned().await.expect("open");
                    let (token, stats, stop, beats) = (token.clone(), stats.clone(), stop.clone(), beats.clone());
                    let managers = managers.clone();
                    handles.push(tokio::spawn(async move {
                        let advertise = std::net::SocketAddr::new(sim_ip, 10_000 + i as u16 % 50_000);
                        let hostname = format!("sim{i:05}");
                        // A refused join (e.g. the leader busy or changing)
                        // is retried through the next manager, as whoever
                        // provisions a fleet would.
                        let mut joined = Err(String::new());
                        for attempt in 0..JOIN_ATTEMPTS {
                            let via = &managers[(i + attempt) % managers.len()];
                            joined = SimNode::join(via, &token, &hostname, advertise, data_path_address(i)).await;
                            if joined.is_ok() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        drop(permit);
                        let (node, took) = joined.map_err(|e| format!("{hostname} could not join: {e}"))?;
                        let node = Arc::new(node);
                        beats.spawn(node.clone().heartbeats(stats.clone(), stop.clone()));
                        tokio::spawn(node.clone().assignments(stats, stop));
                        Ok::<_, String>((node, took))
                    }));
                }
                let mut out = Vec::new();
                for h in handles {
                    out.push(h.await.expect("a join task"));
                }
                out
            }
        }))
        .expect("the joins");
    let joined: Vec<(Arc<SimNode>, Duration)> = match joined.into_iter().collect() {
        Ok(all) => all,
        Err(e) => {
            swarm.dump_logs();
            panic!("{e}");
        }
    };
    let mut took: Vec<f64> = joined.iter().map(|(_, t)| t.as_secs_f64() * 1e3).collect();
    took.sort_by(f64::total_cmp);
    report.join_p50_ms = percentile(&took, 0.50);
    report.join_p99_ms = percentile(&took, 0.99);
    swarm.wait(&format!("{n} simulated nodes ready"), Duration::from_secs(600), || {
        ready_nodes(&swarm) >= n + 3
    });
    report.fleet_join_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "joined: p50 {:.1} ms, p99 {:.1} ms, all Ready after {:.1} s",
        report.join_p50_ms, report.join_p99_ms, report.fleet_join_s
    );
    report.session_kib = (rss_kib(pids[leader]).saturating_sub(rss_before)) as f64 / n as f64;
    report.idle = load(&pids, &stats, Duration::from_secs(10));
    eprintln!("idle: {:?}", report.idle);

    // 10,000 tasks in one service: create -> every one reported Running.
    let t0 = Instant::now();
    let bulk = BULK_TASKS.to_string();
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "bulk",
            "--replicas",
            &bulk,
            "--",
            "sleep",
            "600",
        ],
    );
    wait_running(&stats, BULK_TASKS, Duration::from_secs(900));
    report.bulk_s = t0.elapsed().as_secs_f64();
    eprintln!("{BULK_TASKS} tasks running after {:.1} s", report.bulk_s);

    // The rest of the load: networks, then services created by four
    // operators at once through the three managers.
    for k in 0..NETWORKS {
        let subnet = format!("10.{}.0.0/16", 100 + k);
        ok_retrying(
            &swarm,
            0,
            &[
                "network",
                "create",
                "--driver",
                "overlay",
                "--subnet",
                &subnet,
                &format!("net{k}"),
            ],
        );
    }
    let rest = services - 1;
    let per = (tasks - BULK_TASKS) / rest;
    let total = BULK_TASKS + per * rest;
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..4 {
            let swarm = &swarm;
            scope.spawn(move || {
                for s in (worker..rest).step_by(4) {
                    let name = format!("svc{s:04}");
                    let network = format!("net{}", s % NETWORKS);
                    let replicas = per.to_string();
                    let publish = format!("{}:80", 30_000 + s);
                    let mut args = vec![
                        "service",
                        "create",
                        "--detach",
                        "--name",
                        &name,
                        "--replicas",
                        &replicas,
                        "--network",
                        &network,
                    ];
                    if s % 10 == 0 {
                        args.extend(["--publish", &publish]);
                    }
                    args.extend(["--", "sleep", "600"]);
                    ok_retrying(swarm, worker % 3, &args);
                }
            });
        }
    });
    wait_running(&stats, total, Duration::from_secs(1800));
    report.rest_s = t0.elapsed().as_secs_f64();
    eprintln!("{total} tasks running after {:.1} s more", report.rest_s);
    // Let the reports settle into the store before measuring steady load.
    std::thread::sleep(Duration::from_secs(5));
    report.loaded = load(&pids, &stats, Duration::from_secs(10));
    eprintln!("loaded: {:?}", report.loaded);
    report.leader_rss_mib = rss_kib(pids[leader]) as f64 / 1024.0;

    let every = n.div_ceil(sample);
    let nodes: Vec<Arc<SimNode>> = joined.iter().step_by(every).map(|(n, _)| n.clone()).collect();
    let sized = nodes.len();
    let measured = runtime
        .block_on(runtime.spawn(async move {
            // Two at a time: each is a whole assignments reply and the
            // planners' work, on cores the managers share.
            let limit = Arc::new(tokio::sync::Semaphore::new(2));
            let mut handles = Vec::new();
            for node in nodes {
                let limit = limit.clone();
                handles.push(tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await.expect("open");
                    node.measure().await
                }));
            }
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.expect("a measure task"));
            }
            out
        }))
        .expect("the measures");
    let measured: Vec<(DataplaneSize, usize)> = measured
        .into_iter()
        .map(|m| m.unwrap_or_else(|e| panic!("measuring a node's assignments: {e}")))
        .collect();
    let sizes: Vec<DataplaneSize> = measured.iter().map(|(s, _)| *s).collect();
    report.per_node = mean(&sizes);
    report.per_node_max = max(&sizes);
    report.assignment_kib = measured.iter().map(|(_, b)| *b as f64).sum::<f64>() / sized as f64 / 1024.0;
    report.sized = sized;

    // Raft: the log, the snapshot, the store file.
    let leader = leader_index(&swarm);
    let info = swarm
        .info(leader)
        .and_then(|i| i.raft)
        .expect("the leader's Raft status");
    report.log_entries = info.last_log_index.unwrap_or(0);
    report.snapshot_mib = info.snapshot_bytes as f64 / 1048576.0;
    report.store_mib = dir_bytes(&swarm.agents[leader].data_dir) as f64 / 1048576.0;

    // A new manager catches up (by snapshot, in chunks).
    let target = swarm.applied(leader).unwrap_or(0);
    let t0 = Instant::now();
    swarm.join(NEW_MANAGER, leader, "manager");
    swarm.wait("the new manager caught up", Duration::from_secs(600), || {
        swarm.applied(NEW_MANAGER).is_some_and(|a| a >= target)
    });
    report.catch_up_s = t0.elapsed().as_secs_f64();
    let snapshot = swarm
        .info(NEW_MANAGER)
        .and_then(|i| i.raft)
        .and_then(|r| r.snapshot_index);
    eprintln!(
        "new manager caught up to {target} in {:.1} s (its snapshot index {snapshot:?})",
        report.catch_up_s
    );

    let _ = stop_tx.send(true);
    runtime.shutdown_timeout(Duration::from_secs(5));
    beats.shutdown_timeout(Duration::from_secs(5));
    eprintln!("{report:?}");
    report
}

/// `meshctl ARGS` on host `i`, retried while the swarm answers
/// "unavailable" (exit 7: a leader change), as an operator would; a retry
/// told the object already exists finds its first attempt applied.
fn ok_retrying(swarm: &Swarm, i: usize, args: &[&str]) {
    for attempt in 0..60 {
        let out = swarm.meshctl(i, args);
        match out.status.code() {
            Some(0) => return,
            Some(7) => std::thread::sleep(Duration::from_secs(1)),
            // A retried create whose first attempt was applied after all.
            Some(4) if attempt > 0 && String::from_utf8_lossy(&out.stderr).contains("already exists") => return,
            _ => break,
        }
    }
    swarm.ok(i, args);
}

/// The manager host whose own `node ls` calls it the leader.
fn leader_index(swarm: &Swarm) -> usize {
    (0..3)
        .find(|&i| {
            swarm
                .nodes(i)
                .iter()
                .any(|(host, _, _, manager)| host == &format!("h{i}") && manager == "Leader")
        })
        .unwrap_or(0)
}

fn ready_nodes(swarm: &Swarm) -> usize {
    let out = swarm.meshctl(0, &["node", "ls", "--format", "json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.iter().filter(|n| n["node"]["status"] == "Ready").count()
}

fn wait_running(stats: &Stats, want: usize, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let running = stats.running.load(Ordering::Relaxed) as usize;
        if running >= want {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{running} of {want} tasks running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The managers' CPU (in cores) and the heartbeats answered per second
/// over `window`.
fn load(pids: &[u32], stats: &Stats, window: Duration) -> Load {
    let cpu0: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let hb0 = stats.heartbeats.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let hb1 = stats.heartbeats.load(Ordering::Relaxed);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Load {
        cpu: (cpu1 - cpu0) as f64 / hz / secs,
        heartbeats_per_s: (hb1 - hb0) as f64 / secs,
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis; utime and
    // stime are the 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn mean(sizes: &[DataplaneSize]) -> DataplaneSize {
    let n = sizes.len().max(1);
    let sum = |f: fn(&DataplaneSize) -> usize| sizes.iter().map(f).sum::<usize>() / n;
    DataplaneSize {
        overlay_objects: sum(|s| s.overlay_objects),
        mesh_entries: sum(|s| s.mesh_entries),
        dns_records: sum(|s| s.dns_records),
        tasks: sum(|s| s.tasks),
    }
}

fn max(sizes: &[DataplaneSize]) -> DataplaneSize {
    let top = |f: fn(&DataplaneSize) -> usize| sizes.iter().map(f).max().unwrap_or(0);
    DataplaneSize {
        overlay_objects: top(|s| s.overlay_objects),
        mesh_entries: top(|s| s.mesh_entries),
        dns_records: top(|s| s.dns_records),
        tasks: top(|s| s.tasks),
    }
}

/// Thousands of simulated nodes hold two sessions each, and the managers
/// (started from here, so they inherit the limit) a socket per session.
/// Raises the open-file limit to 1,048,576 (the kernel's `nr_open`
/// default) for this process and its children; without CAP_SYS_RESOURCE
/// (this sandbox: a hard limit of 20,000, enough for 5,000 nodes), the soft
/// limit only up to the hard one, and says so.
fn raise_open_files() {
    let wanted = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    // Without CAP_SYS_RESOURCE (as in some sandboxes), up to the hard limit.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit; setrlimit reads it.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    eprintln!(
        "open-file limit {} (could not raise it to 2^20: {error}); each simulated node holds two sessions, \
         each manager one or two per node",
        if raised {
            limit.rlim_cur.to_string()
        } else {
            "unchanged".into()
        }
    );
}
