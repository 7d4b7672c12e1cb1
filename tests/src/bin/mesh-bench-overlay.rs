//! `cargo xtask bench overlay`: the overlays' figures (release binaries), on
//! a real 2-node swarm in network namespaces, each figure a ratio to the
//! bare underlay measured in the same run on the same hosts.
//!
//! - Throughput: iperf3 (TCP, one stream) from a task on h0 to a task on
//!   h1 across the overlay, divided by iperf3 from h0 to h1 on the
//!   underlay addresses.
//! - Request/response: 1-byte TCP round trips on one connection
//!   (netperf's TCP_RR) to an echo server in h1's task over the overlay,
//!   and to the same server run on h1 itself; p50 and p99 of each.
//! - The same two over an encrypted overlay (WireGuard: the kernel's where
//!   it has it, else boringtun in the agent), divided by the plain
//!   overlay. `--wireguard kernel|userspace` picks one.
//! - The same over an IPsec overlay (kernel ESP), where the kernel has
//!   ESP (`cargo xtask bench overlay --vm` runs it in Debian's kernel).
//!
//! `--round-trips N` sets the request/response sample (20,000).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::agent::net::netns::NetNs;
use mesh_tests::{
    process::Process,
    require_root,
    swarm::{binary, Swarm},
};

const IPERF_SECONDS: &str = "5";
const ROUND_TRIPS: usize = 20_000;
const USAGE: &str = "usage: mesh-bench-overlay [--wireguard kernel|userspace] [--round-trips N]";
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;

fn main() {
    require_root();
    let mut flags: &'static [&'static str] = &[];
    let mut samples = ROUND_TRIPS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().as_deref()) {
            ("--wireguard", Some("kernel")) => flags = &["--wireguard", "kernel"],
            ("--wireguard", Some("userspace")) => flags = &["--wireguard", "userspace"],
            ("--round-trips", Some(n)) => samples = n.parse().expect(USAGE),
            _ => panic!("{USAGE}"),
        }
    }
    let swarm = Swarm::with_flags(2, flags);
    let (h0, h1) = (swarm.cluster.host(0), swarm.cluster.host(1));
    let esp = h0.run(mesh_agent::dataplane::xfrm::kernel_has_esp);
    if let Err(why) = &esp {
        println!(
            "== IPsec: not measured, this kernel has no ESP ({why}); `cargo xtask bench overlay --vm` measures it"
        );
    }
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", Duration::from_secs(30), || swarm.ready(0) == 2);
    swarm.ok(0, &["network", "create", "bench"]);
    swarm.ok(0, &["network", "create", "--opt", "encrypted", "sealed"]);
    if esp.is_ok() {
        swarm.ok(0, &["network", "create", "--opt", "encrypted=ipsec", "esp"]);
    }
    let echo = binary("mesh-echo");
    let port = ECHO_PORT.to_string();
    for (name, node, command) in [
        ("server", "h1", vec![echo.to_str().unwrap(), &port]),
        ("client", "h0", vec!["sleep", "100000"]),
        ("iperf", "h1", vec!["iperf3", "-s", "-p", "5201"]),
    ] {
        let constraint = format!("node.hostname=={node}");
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--network",
            "bench",
            "--network",
            "sealed",
            "--constraint",
            &constraint,
        ];
        if esp.is_ok() {
            args.extend(["--network", "esp"]);
        }
        args.push("--");
        args.extend(command);
        swarm.ok(0, &args);
    }
    let endpoints = endpoints(&swarm, "bench");
    let sealed = endpoints_on(&swarm, "sealed");
    let task_of = |service: &str| endpoints.iter().find(|e| e.1.starts_with(service)).cloned().unwrap();
    let sealed_of = |service: &str| sealed.iter().find(|e| e.1.starts_with(service)).unwrap().2;
    let (client_task, _, _) = task_of("client.");
    let (_, _, server_address) = task_of("server.");
    let (_, _, iperf_address) = task_of("iperf.");
    let (sealed_server, sealed_iperf) = (sealed_of("server."), sealed_of("iperf."));
    let esp_endpoints = if esp.is_ok() {
        endpoints_on(&swarm, "esp")
    } else {
        vec![]
    };
    let esp_of = |service: &str| esp_endpoints.iter().find(|e| e.1.starts_with(service)).map(|e| e.2);
    let (esp_server, esp_iperf) = (esp_of("server."), esp_of("iperf."));
    let client_ns = NetNs::open_at(
        &swarm.agents[0].data_dir.join("tasks").join(&client_task).join("netns"),
        "client task",
    )
    .expect("the client task's namespace");

    // The bare references: the same servers on h1 itself.
    let mut bare_echo = Command::new(&echo);
    bare_echo.arg(&port).stdout(Stdio::null());
    let _bare_echo = h1.spawn(bare_echo).expect("echo on h1");
    let mut bare_iperf = Command::new("iperf3");
    bare_iperf.args(["-s", "-p", "5202"]).stdout(Stdio::null());
    let _bare_iperf = h1.spawn(bare_iperf).expect("iperf3 on h1");
    std::thread::sleep(Duration::from_millis(500));

    let bare_rr = h0.run(|| round_trips(h1.address(), samples));
    let overlay_rr = client_ns
        .run(|| round_trips(server_address, samples))
        .expect("enter the task");
    let sealed_rr = client_ns
        .run(|| round_trips(sealed_server, samples))
        .expect("enter the task");
    let bare_bps = iperf(h0.netns(), h1.address(), 5202);
    let overlay_bps = iperf(&client_ns, iperf_address, IPERF_PORT);
    let sealed_bps = iperf(&client_ns, sealed_iperf, IPERF_PORT);
    let esp_figures = esp_server.zip(esp_iperf).map(|(server, iperf_to)| {
        let rr = client_ns.run(|| round_trips(server, samples)).expect("enter the task");
        (rr, iperf(&client_ns, iperf_to, IPERF_PORT))
    });
    let mode = if h0.run(mesh_agent::dataplane::wireguard::kernel_has_wireguard) && !flags.contains(&"userspace") {
        "kernel WireGuard"
    } else {
        "boringtun WireGuard"
    };

    println!(
        "== TCP throughput (iperf3, 1 stream, {IPERF_SECONDS} s): overlay {:.2} Gbit/s; bare underlay {:.2} Gbit/s; ratio {:.2}",
        overlay_bps / 1e9,
        bare_bps / 1e9,
        overlay_bps / bare_bps
    );
    for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
        let (o, b) = (quantile(&overlay_rr, q), quantile(&bare_rr, q));
        println!(
            "== TCP request/response ({samples} round trips) {label}: overlay {:.1} us; bare underlay {:.1} us; ratio {:.2}",
            o * 1e6,
            b * 1e6,
            o / b
        );
    }
    println!(
        "== TCP throughput, encrypted ({mode}): {:.2} Gbit/s; plain overlay {:.2} Gbit/s; ratio {:.2}",
        sealed_bps / 1e9,
        overlay_bps / 1e9,
        sealed_bps / overlay_bps
    );
    for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
        let (e, o) = (quantile(&sealed_rr, q), quantile(&overlay_rr, q));
        println!(
            "== TCP request/response {label}, encrypted ({mode}): {:.1} us; plain overlay {:.1} us; ratio {:.2}",
            e * 1e6,
            o * 1e6,
            e / o
        );
    }
    if let Some((esp_rr, esp_bps)) = esp_figures {
        println!(
            "== TCP throughput, encrypted (IPsec ESP AES-GCM): {:.2} Gbit/s; plain overlay {:.2} Gbit/s; ratio {:.2}",
            esp_bps / 1e9,
            overlay_bps / 1e9,
            esp_bps / overlay_bps
        );
        for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
            let (e, o) = (quantile(&esp_rr, q), quantile(&overlay_rr, q));
            println!(
                "== TCP request/response {label}, encrypted (IPsec ESP AES-GCM): {:.1} us; plain overlay {:.1} us; ratio {:.2}",
                e * 1e6,
                o * 1e6,
                e / o
            );
        }
    }
    for name in ["server", "client", "iperf"] {
        swarm.ok(0, &["service", "rm", name]);
    }
}

/// (task, name, address) of every endpoint on `network`, once all three
/// services run.
fn endpoints(swarm: &Swarm, network: &str) -> Vec<(String, String, Ipv4Addr)> {
    swarm.wait("3 endpoints running", Duration::from_secs(60), || {
        let out = swarm.meshctl(0, &["service", "ls", "--format", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.len() == 3 && list.iter().all(|s| s["running"] == 1)
    });
    endpoints_on(swarm, network)
}

/// (task, name, address) of every endpoint on `network`.
fn endpoints_on(swarm: &Swarm, network: &str) -> Vec<(String, String, Ipv4Addr)> {
    let out = swarm.ok(0, &["network", "inspect", network]);
    let view: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    view[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["task"].as_str().unwrap().to_string(),
                e["name"].as_str().unwrap().to_string(),
                e["address"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Seconds per 1-byte round trip on one connection to an echo server.
fn round_trips(to: Ipv4Addr, count: usize) -> Vec<f64> {
    let stream = TcpStream::connect(SocketAddr::from((to, ECHO_PORT))).expect("connect to the echo server");
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("the greeting");
    let mut byte = [0u8; 1];
    // Warm up (ARP, caches), then measure.
    for _ in 0..200 {
        (&stream).write_all(b"x").unwrap();
        reader.read_exact(&mut byte).unwrap();
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t0 = Instant::now();
        (&stream).write_all(b"x").unwrap();
        reader.read_exact(&mut byte).unwrap();
        samples.push(t0.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Bits per second iperf3 received from `ns` to `to:port`.
fn iperf(ns: &NetNs, to: Ipv4Addr, port: u16) -> f64 {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &to.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        IPERF_SECONDS,
        "-J",
    ]);
    let out = Process::output_in(ns, cmd, Duration::from_secs(30)).expect("run iperf3");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 to {to}:{port} printed no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 to {to}:{port}: {report}"))
}
