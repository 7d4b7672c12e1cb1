//! `cargo xtask bench services`: the services' figures (release binaries).
//!
//! - create -> running: `meshctl service create --replicas N` on a real
//!   3-node swarm in network namespaces, until `service ps` shows N tasks
//!   Running; for N = 10 and 100. The reference, on the same machine in
//!   the same run, is the bare kernel work the nodes do for those tasks
//!   (N namespaces, N veths with addresses, N processes) done in one loop
//!   with the agent's own runtime functions and no cluster around it.
//! - scheduler: the orchestrator's pure plan() placing 1,000 services of 5
//!   replicas (5,000 tasks) on 100 simulated nodes; decisions per second.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_agent::{
    agent::{
        net::{
            bridge::{LocalNetwork, Subnet},
            netns::NetNs,
        },
        tasks::process,
    },
    api::{
        objects::{Availability, ClusterSpec, Node, NodeStatus, Role, DEFAULT_DATA_PATH_PORT},
        security::Security,
        service::{Service, ServiceMode, ServiceSpec},
        store::{ClusterState, Command},
    },
    manager::{orchestrator, state::Apply},
};
use mesh_tests::{require_root, swarm::Swarm};

fn main() {
    require_root();
    scheduler();
    let mut swarm = Swarm::with_flags(3, &[]);
    swarm.form_with_workers();
    for n in [10usize, 10, 100] {
        let cluster = create_to_running(&swarm, n);
        let floor = kernel_floor(n, Start::Sandboxed);
        let bare = kernel_floor(n, Start::Bare);
        println!(
            "== create -> running, {n} replicas on 3 nodes: {:.0} ms; bare kernel work for {n} tasks on one host: {:.0} ms; ratio {:.1}x",
            cluster.as_secs_f64() * 1e3,
            floor.as_secs_f64() * 1e3,
            cluster.as_secs_f64() / floor.as_secs_f64()
        );
        println!(
            "== the sandbox, {n} tasks on one host: {:.0} ms sandboxed, {:.0} ms as plain processes in their network namespace; ratio {:.2}",
            floor.as_secs_f64() * 1e3,
            bare.as_secs_f64() * 1e3,
            floor.as_secs_f64() / bare.as_secs_f64()
        );
    }
    swarm.kill(0);
}

fn create_to_running(swarm: &Swarm, n: usize) -> Duration {
    let name = format!("bench{n}-{}", t0_id());
    let replicas = n.to_string();
    let t0 = Instant::now();
    swarm.ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            &name,
            "--replicas",
            &replicas,
            "--",
            "sleep",
            "600",
        ],
    );
    loop {
        let out = swarm.meshctl(0, &["service", "ls", "--format", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let running = list
            .iter()
            .find(|s| s["service"]["spec"]["name"] == name.as_str())
            .and_then(|s| s["running"].as_u64())
            .unwrap_or(0);
        if running as usize == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{name}: {running} of {n} running after 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    swarm.ok(0, &["service", "rm", &name]);
    swarm.wait("bench tasks gone", Duration::from_secs(120), || {
        let out = swarm.meshctl(0, &["service", "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    took
}

/// What the nodes do for `n` tasks, with nothing else: a host namespace,
/// then per task a namespace, a veth on the bridge with an address and a
/// route, and a `sleep` process in its sandbox.
fn kernel_floor(n: usize, start: Start) -> Duration {
    remove_stale_floors();
    let host = format!("{FLOOR_PREFIX}{}", std::process::id());
    let floor = FloorHost::new(&host);
    let dir = floor.dir.clone();
    let ns = NetNs::create(&host).expect("a host namespace");
    let took = ns
        .run(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let network = LocalNetwork::new(Subnet::parse("172.18.0.0/16").expect("a subnet"));
                let log = std::fs::File::create(dir.join("log")).expect("a log");
                let env = BTreeMap::new();
                let command = vec!["sleep".to_string(), "600".to_string()];
                let init = mesh_tests::swarm::binary("mesh-agent");
                let confinement = process::confinement(&Security::default(), None).expect("the default confinement");
                let t0 = Instant::now();
                let mut children = Vec::new();
                for task in 0..n as u64 {
                    let path = dir.join(format!("ns{task}"));
                    let _task_ns = NetNs::create_at(&path, "floor").expect("a task namespace");
                    network.attach(task + 1, &path).await.expect("attach");
                    let child = match start {
                        Start::Bare => bare_spawn(&command, &path),
                        Start::Sandboxed => process::spawn(&process::Launch {
                            init: &init,
                            command: &command,
                            env: &env,
                            workdir: None,
                            hostname: "floor",
                            netns: &path,
                            log: &log,
                            resolv_conf: None,
                            cgroup_procs: &[],
                            binds: &[],
                            masked: &[],
                            confinement: &confinement,
                            read_only: false,
                            mounts: &[],
                        })
                        .await
                        .expect("spawn"),
                    };
                    children.push(child);
                }
                let took = t0.elapsed();
                for (task, mut child) in children.into_iter().enumerate() {
                    let _ = child.kill().await;
                    network.detach(task as u64 + 1).await;
                    let _ = NetNs::delete_at(&dir.join(format!("ns{task}")), "floor");
                }
                took
            })
        })
        .expect("enter the host namespace");
    drop(ns);
    drop(floor);
    took
}

const FLOOR_PREFIX: &str = "meshbench-floor-";

/// The floor's host namespace and its tasks' namespace files, removed on
/// drop, so a run that panics leaves none behind.
struct FloorHost {
    name: String,
    dir: std::path::PathBuf,
}

impl FloorHost {
    fn new(name: &str) -> FloorHost {
        let floor = FloorHost {
            name: name.to_string(),
            dir: std::env::temp_dir().join(name),
        };
        floor.remove();
        std::fs::create_dir_all(&floor.dir).expect("a directory");
        floor
    }

    fn remove(&self) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let _ = NetNs::delete_at(&entry.path(), "floor");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = NetNs::delete(&self.name);
    }
}

impl Drop for FloorHost {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Floors of benchmark processes that died before cleaning up.
fn remove_stale_floors() {
    let names = NetNs::list().unwrap_or_default().into_iter().chain(
        std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned()),
    );
    for name in names {
        let Some(pid) = name.strip_prefix(FLOOR_PREFIX).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Dropped at once: removed.
            drop(FloorHost {
                dir: std::env::temp_dir().join(&name),
                name,
            });
        }
    }
}

/// How the floor starts its processes.
#[derive(Clone, Copy)]
enum Start {
    /// As the agent does: through `mesh-agent task-init`, in the sandbox.
    Sandboxed,
    /// The reference without the sandbox: forked straight into the task's
    /// network namespace with a UTS and mount namespace of its own.
    Bare,
}

fn bare_spawn(command: &[String], netns: &std::path::Path) -> tokio::process::Child {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let ns = std::fs::File::open(netns).expect("the task's namespace");
    let fd = ns.as_raw_fd();
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: system calls only, in the child, on a descriptor open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for ret in [
                libc::setsid(),
                libc::setns(fd, libc::CLONE_NEWNET),
                libc::unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWNS),
            ] {
                if ret < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd).spawn().expect("spawn");
    drop(ns);
    child
}

/// The pure scheduler on 100 simulated nodes and 1,000 services.
fn scheduler() {
    let mut state = ClusterState {
        cluster: Some(ClusterSpec {
            id: "bench".into(),
            created_at: 0,
            default_addr_pool: vec![],
            default_addr_pool_mask_len: 24,
            autolock: false,
            heartbeat_period_ms: 1000,
            heartbeat_misses_down: 3,
            cert_expiry_secs: 3600,
            task_history_limit: 5,
            data_path_port: DEFAULT_DATA_PATH_PORT,
            overlay_key_rotation_secs: 43200,
        }),
        ..ClusterState::default()
    };
    for id in 1..=100u64 {
        state.nodes.insert(
            id,
            Node {
                id,
                hostname: format!("sim{id}"),
                role: Role::Worker,
                status: NodeStatus::Ready,
                availability: Availability::Active,
                labels: [("zone".to_string(), format!("z{}", id % 4))].into(),
                addr: format!("10.0.{}.{}:2377", id / 250, id % 250),
                data_path_addr: String::new(),
                agent_version: String::new(),
                wireguard_key: String::new(),
                resources: Default::default(),
                certs: Default::default(),
                status_message: String::new(),
                created_at: 0,
                updated_at: 0,
            },
        );
    }
    for id in 1..=1000u64 {
        state.services.insert(
            id,
            Service {
                id,
                spec: ServiceSpec {
                    mode: ServiceMode::Replicated { replicas: 5 },
                    spread_over: if id % 2 == 0 { vec!["zone".into()] } else { vec![] },
                    ..ServiceSpec::new(format!("svc{id}"), vec!["sleep".into(), "600".into()])
                },
                version: 1,
                created_at: 0,
                updated_at: 0,
                previous_spec: None,
                update_status: None,
                vips: Vec::new(),
            },
        );
    }
    let mut next = 0u64;
    let t0 = Instant::now();
    let plan = orchestrator::plan(&state, 1_000_000, &mut || {
        next += 1;
        next
    })
    .expect("a plan");
    let took = t0.elapsed();
    let placed = match &plan {
        Command::ApplyPlan { create, .. } => create.len(),
        _ => 0,
    };
    state.apply(&plan);
    let t1 = Instant::now();
    let again = orchestrator::plan(&state, 1_000_001, &mut || {
        next += 1;
        next
    });
    let converged = t1.elapsed();
    assert!(again.is_none(), "a converged cluster plans nothing");
    println!(
        "== scheduler (pure, simulated): 1,000 services x 5 replicas on 100 nodes: {placed} placements in {:.1} ms = {:.0} decisions/s; a converged pass over them takes {:.1} ms",
        took.as_secs_f64() * 1e3,
        placed as f64 / took.as_secs_f64(),
        converged.as_secs_f64() * 1e3
    );
}

fn t0_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
