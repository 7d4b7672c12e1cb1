//! `cargo xtask bench control`: the control plane's figures, measured on a
//! real 3-manager swarm in network namespaces (release binaries).
//!
//! - failover: SIGKILL the leader, time until the next write commits
//!   through a surviving manager; N trials; median and p99, and their ratio
//!   to the configured election timeout (the reference).
//! - store writes: proposals/s and latency percentiles of `node update`
//!   writes sent concurrently through a follower's local socket (socket ->
//!   forward to leader over mTLS -> Raft commit on a quorum -> reply).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::{
    api::{
        messages::{ClusterRequest, LocalRequest},
        objects::NodeUpdate,
    },
    wire::local,
};
use mesh_tests::{require_root, swarm::Swarm};

/// The agent's default election timeout (`mesh-agent run --raft-election-timeout`);
/// the bench runs the agents with their defaults.
const ELECTION_TIMEOUT: Duration = Duration::from_millis(150);

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let trials: usize = flag(&args, "--trials").unwrap_or(20);
    let writes: usize = flag(&args, "--writes").unwrap_or(2000);
    let concurrency: usize = flag(&args, "--concurrency").unwrap_or(16);
    let verbose = args.iter().any(|a| a == "--verbose");

    let mut swarm = Swarm::with_flags(3, &[]);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    converge(&swarm);

    println!("== store writes: {writes} proposals, {concurrency} concurrent clients, through a follower");
    let first_leader = leader(&swarm);
    let follower = (0..3).find(|i| *i != first_leader).expect("two followers");
    let socket = swarm.agents[follower].socket.clone();
    let (rate, lat) = write_load(socket, writes, concurrency);
    println!(
        "   {rate:.0} proposals/s; latency p50 {:.2} ms, p99 {:.2} ms",
        pct(&lat, 50.0).as_secs_f64() * 1e3,
        pct(&lat, 99.0).as_secs_f64() * 1e3
    );

    println!("\n== failover: leader SIGKILL -> next committed write, {trials} trials (election timeout {ELECTION_TIMEOUT:?})");
    let mut samples = Vec::new();
    for trial in 0..trials {
        let leader = leader(&swarm);
        let writer = (0..3).find(|i| *i != leader).expect("a survivor");
        // Make sure the survivor's write path is warm before the kill.
        write_once(&swarm.agents[writer].socket, &format!("warm{trial}")).expect("a write before the kill");
        let t0 = Instant::now();
        swarm.kill(leader);
        let mut n = 0;
        let mut last_error = String::new();
        loop {
            n += 1;
            match write_once(&swarm.agents[writer].socket, &format!("t{trial}-{n}")) {
                Ok(()) => break,
                Err(e) if verbose && e != last_error => {
                    println!("      {:6.0} ms: {e}", t0.elapsed().as_secs_f64() * 1e3);
                    last_error = e;
                }
                Err(_) => {}
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no write committed within 30 s of the leader's death"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = t0.elapsed();
        samples.push(took);
        println!("   trial {:2}: {:7.1} ms", trial + 1, took.as_secs_f64() * 1e3);
        swarm.start(leader);
        converge(&swarm);
    }
    samples.sort();
    let (p50, p99) = (pct(&samples, 50.0), pct(&samples, 99.0));
    println!(
        "   median {:.0} ms ({:.2}x the election timeout), p99 {:.0} ms ({:.2}x)",
        p50.as_secs_f64() * 1e3,
        p50.as_secs_f64() / ELECTION_TIMEOUT.as_secs_f64(),
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / ELECTION_TIMEOUT.as_secs_f64()
    );
}

fn flag(args: &[String], name: &str) -> Option<usize> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn converge(swarm: &Swarm) {
    swarm.wait("3 managers in agreement", Duration::from_secs(60), || {
        let v = swarm.nodes(0);
        v.len() == 3 && v.iter().all(|n| n.1 == "Ready") && v.iter().filter(|n| n.3 == "Reachable").count() == 2
    });
}

fn leader(swarm: &Swarm) -> usize {
    let rows = swarm.nodes(0);
    let name = rows
        .iter()
        .find(|n| n.3 == "Leader")
        .map(|n| n.0.clone())
        .expect("a leader");
    name.trim_start_matches('h').parse().expect("hosts are named hN")
}

fn write_once(socket: &std::path::Path, key: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(write(socket, key))
}

async fn write(socket: &std::path::Path, key: &str) -> Result<(), String> {
    let update = NodeUpdate {
        label_add: [(key.to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    let request = LocalRequest::Cluster(ClusterRequest::NodeUpdate {
        node: "h0".into(),
        update,
    });
    local::call(socket, &request).await.map(|_| ()).map_err(|e| e.message)
}

fn write_load(socket: PathBuf, total: usize, concurrency: usize) -> (f64, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let socket = Arc::new(socket);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..concurrency {
            let socket = socket.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in (c..total).step_by(concurrency) {
                    let s = Instant::now();
                    write(&socket, &format!("k{}", i % 64)).await.expect("write");
                    lat.push(s.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("writer"));
        }
        let rate = total as f64 / t0.elapsed().as_secs_f64();
        all.sort();
        (rate, all)
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
