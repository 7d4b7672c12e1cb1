//! Kernel lane: encrypted overlays. On the host's kernel, which
//! has no WireGuard, the agent runs boringtun on a TUN device; the VM lane
//! runs the same checks with the kernel's WireGuard.
//!
//! `vm_swarm_encryption.rs` includes this file for the scenario.
//!
//! A marker string sent between tasks on two nodes shows up in a capture
//! of the underlay for a plain network and never for an encrypted one; the
//! encrypted network's entries point into the tunnel; the overlay key
//! rotates when a node is removed, and a TCP stream carries on across it.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_agent::dataplane::{
    wireguard::DEVICE,
    xfrm::{self, Xfrm},
};
use mesh_tests::{
    overlay::{endpoints, has_link, in_task, inspect, overlays_on, running},
    require_root,
    swarm::{binary, Swarm},
};

const CONVERGE: Duration = Duration::from_secs(30);
const PORT: u16 = 7000;
const MARKER: &str = "MESH-MARKER-7f3a9c";

/// Sends `text` to the echo server at `address` and returns the echo.
fn echo_line(address: Ipv4Addr, text: &str) -> Result<String, String> {
    let to = SocketAddr::from((address, PORT));
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("{to}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).map_err(|e| e.to_string())?;
    (&stream)
        .write_all(format!("{text}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut back = String::new();
    reader.read_line(&mut back).map_err(|e| e.to_string())?;
    Ok(back.trim().to_string())
}

/// A capture of host `host`'s underlay link, written as it goes.
struct Capture {
    file: PathBuf,
    _process: mesh_tests::process::Process,
}

impl Capture {
    fn start(swarm: &Swarm, host: usize, file: &Path) -> Capture {
        let _ = std::fs::remove_file(file);
        let mut cmd = Command::new("tcpdump");
        // Immediate mode: packets reach the file as they pass, not a
        // buffer block later.
        cmd.args(["-i", "eth0", "--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(file);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let process = swarm.cluster.host(host).spawn(cmd).expect("tcpdump runs");
        // The pcap header is written once the capture is attached.
        swarm.wait("tcpdump attached", Duration::from_secs(10), || {
            std::fs::metadata(file).is_ok_and(|m| m.len() >= 24)
        });
        std::thread::sleep(Duration::from_millis(300));
        Capture {
            file: file.to_path_buf(),
            _process: process,
        }
    }

    fn contains(&self, needle: &[u8]) -> bool {
        let bytes = std::fs::read(&self.file).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.file).map_or(0, |m| m.len())
    }
}

fn key_epoch(swarm: &Swarm, network: &str) -> u64 {
    inspect(swarm, network)["key_epoch"].as_u64().unwrap_or(0)
}

/// The ESP associations the agent made on host `host`: (src, dst, spi).
fn esp_sas(swarm: &Swarm, host: usize) -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr, u32)> {
    let found = swarm
        .cluster
        .host(host)
        .run(|| Xfrm::open().and_then(|mut x| x.observe()))
        .expect("read the XFRM state");
    found.sas.iter().map(|id| (id.src, id.dst, id.spi)).collect()
}

/// A line-echo stream to a task's echo server, past its greeting.
struct Stream {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Stream {
    fn open(swarm: &Swarm, host: usize, task: &str, to: Ipv4Addr, greeting: &str) -> Stream {
        let stream = in_task(swarm, host, task, move || {
            TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), Duration::from_secs(5))
        })
        .expect("a stream to the task");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), greeting);
        Stream { stream, reader }
    }

    fn echo(&mut self, text: &str) {
        let text = format!("{text}\n");
        (&self.stream)
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("the stream survives ({text:?}): {e}"));
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("an echo of {text:?}: {e}"));
        assert_eq!(line, text);
    }
}

/// The whole scenario, with `flags` for every agent.
pub fn encrypted_overlays_hide_the_payload_and_survive_key_rotation(flags: &'static [&'static str]) {
    let swarm = Swarm::with_flags(3, flags);
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.join(2, 0, "worker");
    swarm.wait("3 nodes ready", CONVERGE, || swarm.ready(0) == 3);
    let echo = binary("mesh-echo");
    let echo = echo.to_str().unwrap();
    let port = PORT.to_string();
    // IPsec needs ESP in the kernel: the VM lane's has it; where it is
    // missing, a task on an IPsec network must be refused instead.
    let esp = swarm.cluster.host(0).run(xfrm::kernel_has_esp);
    if let Err(why) = &esp {
        eprintln!(
            "IPsec: this kernel has no ESP ({why}); only the refusal of IPsec tasks is checked here, the VM lane checks the dataplane"
        );
    }
    let ipsec = esp.is_ok();

    swarm.ok(0, &["network", "create", "clear"]);
    swarm.ok(0, &["network", "create", "--opt", "encrypted", "sealed"]);
    let mut services = vec![("plain", "clear"), ("secret", "sealed")];
    if ipsec {
        swarm.ok(0, &["network", "create", "--opt", "encrypted=ipsec", "esp"]);
        services.push(("ipsec", "esp"));
    }
    for &(name, network) in &services {
        swarm.ok(
            0,
            &[
                "service",
                "create",
                "--mode",
                "global",
                "--name",
                name,
                "--network",
                network,
                "--",
                echo,
                &port,
            ],
        );
    }
    swarm.wait("the services on 3 nodes", CONVERGE, || {
        services.iter().all(|(name, _)| running(&swarm, name) == 3)
    });
    let on = |network: &str, node: &str| {
        endpoints(&swarm, network)
            .into_iter()
            .find(|(_, n, _)| n == node)
            .expect("a task there")
    };
    let (plain_h0, _, _) = on("clear", "h0");
    let (_, _, plain_h1) = on("clear", "h1");
    let (secret_h0, _, _) = on("sealed", "h0");
    let (secret_task_h1, _, secret_h1) = on("sealed", "h1");

    let dir = swarm.agents[0].data_dir.parent().unwrap().to_path_buf();

    // The plain network carries the marker in clear on the underlay.
    let capture = Capture::start(&swarm, 1, &dir.join("plain.pcap"));
    let marker = format!("{MARKER}-plain");
    let m = marker.clone();
    let back = in_task(&swarm, 0, &plain_h0, move || echo_line(plain_h1, &m));
    assert_eq!(back.as_deref(), Ok(marker.as_str()));
    swarm.wait("the plain marker captured", Duration::from_secs(5), || {
        capture.contains(marker.as_bytes())
    });
    drop(capture);

    // The encrypted network delivers it too, but the underlay never
    // carries it: only WireGuard datagrams.
    let capture = Capture::start(&swarm, 1, &dir.join("sealed.pcap"));
    let before = capture.len();
    let marker = format!("{MARKER}-sealed");
    for round in 0..5 {
        let m = format!("{marker}-{round}");
        let back = in_task(&swarm, 0, &secret_h0, move || echo_line(secret_h1, &m));
        assert_eq!(
            back,
            Ok(format!("{marker}-{round}")),
            "round {round} over the encrypted network"
        );
    }
    swarm.wait("the exchange captured", Duration::from_secs(5), || {
        capture.len() > before + 500
    });
    assert!(
        !capture.contains(marker.as_bytes()),
        "the encrypted network's payload appeared on the underlay"
    );
    drop(capture);

    // The tunnel's traffic and handshakes show in the metrics.
    let (_, metrics) = mesh_tests::mesh::metrics_get(&swarm, 0, "/metrics");
    let received: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_wireguard_peer_received_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(received > 0.0, "h0's WireGuard peers sent it bytes:\n{metrics}");
    assert!(
        metrics.contains("mesh_wireguard_peer_handshake_age_seconds{peer="),
        "h0 reports its handshakes:\n{metrics}"
    );

    // Its entries point at the other nodes' tunnel addresses, and every
    // node has the tunnel device.
    let sealed_vni = inspect(&swarm, "sealed")["network"]["vni"].as_u64().unwrap() as u32;
    for host in 0..3 {
        let state = overlays_on(&swarm, host)
            .remove(&sealed_vni)
            .expect("sealed on every node");
        assert!(
            matches!(state.local, Some(IpAddr::V6(_))),
            "h{host} encapsulates from its tunnel address"
        );
        assert_eq!(state.fdb.len(), 2, "h{host}: the two other nodes' tasks");
        assert!(state.fdb.values().all(|v| v.is_ipv6()), "h{host}: into the tunnel");
        assert_eq!(state.mtu, 1370, "1500 minus WireGuard's 60 and VXLAN over IPv6's 70");
        assert!(has_link(&swarm, host, DEVICE), "h{host} has {DEVICE}");
        if flags.contains(&"kernel") {
            let device = swarm
                .cluster
                .host(host)
                .run(|| mesh_agent::dataplane::wireguard::kernel_observe(DEVICE))
                .expect("a kernel WireGuard device");
            assert_eq!(device.port, 51820);
            assert_eq!(device.peers.len(), 2, "h{host}: the two other nodes");
            assert!(
                device.peers.values().all(|p| p.psk != [0; 32]),
                "h{host}: with pair keys"
            );
        }
    }

    // The IPsec network: the same, in ESP between the data-path
    // addresses, to its own VXLAN port.
    let host_ip = |h: usize| swarm.cluster.host(h).address();
    let mut esp_stream = None;
    if ipsec {
        let (esp_h0, _, _) = on("esp", "h0");
        let (esp_task_h1, _, esp_h1) = on("esp", "h1");
        let capture = Capture::start(&swarm, 1, &dir.join("esp.pcap"));
        let before = capture.len();
        let marker = format!("{MARKER}-esp");
        for round in 0..5 {
            let m = format!("{marker}-{round}");
            let back = in_task(&swarm, 0, &esp_h0, move || echo_line(esp_h1, &m));
            assert_eq!(back, Ok(format!("{marker}-{round}")), "round {round} over IPsec");
        }
        swarm.wait("the ESP exchange captured", Duration::from_secs(5), || {
            capture.len() > before + 500
        });
        assert!(
            !capture.contains(marker.as_bytes()),
            "the IPsec network's payload appeared on the underlay"
        );
        drop(capture);
        let esp_vni = inspect(&swarm, "esp")["network"]["vni"].as_u64().unwrap() as u32;
        for host in 0..3 {
            let state = overlays_on(&swarm, host).remove(&esp_vni).expect("esp on every node");
            assert_eq!(
                state.local,
                Some(IpAddr::V4(host_ip(host))),
                "h{host}: from its address"
            );
            assert_eq!(state.port, 4790, "h{host}: to the IPsec VXLAN port");
            assert_eq!(state.mtu, 1413, "1500 minus VXLAN's 50 and ESP's 37");
            assert_eq!(state.fdb.len(), 2, "h{host}: the two other nodes' tasks");
            let sas = esp_sas(&swarm, host);
            let outbound = sas.iter().filter(|(src, _, _)| *src == host_ip(host)).count();
            assert_eq!(outbound, 2, "h{host}: one outbound association per peer: {sas:?}");
            assert_eq!(
                sas.len() - outbound,
                2,
                "h{host}: one inbound per peer and key: {sas:?}"
            );
        }
        esp_stream = Some(Stream::open(&swarm, 0, &esp_h0, esp_h1, &esp_task_h1));
    }

    // Removing a node rotates the overlay key; streams between the other
    // two carry on across the rotation.
    let epoch = key_epoch(&swarm, "sealed");
    assert!(epoch >= 1, "an overlay key exists");
    let mut stream = Stream::open(&swarm, 0, &secret_h0, secret_h1, &secret_task_h1);
    let outbound_to_h1 = |sas: Vec<(Ipv4Addr, Ipv4Addr, u32)>| -> Vec<u32> {
        sas.into_iter()
            .filter(|(_, dst, _)| *dst == host_ip(1))
            .map(|(_, _, spi)| spi)
            .collect()
    };
    let esp_before = outbound_to_h1(esp_sas(&swarm, 0));
    swarm.ok(2, &["swarm", "leave"]);
    swarm.wait("h2 down", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h2" && n.1 == "Down")
    });
    swarm.ok(0, &["node", "rm", "h2"]);
    swarm.wait("the overlay key rotated", CONVERGE, || {
        key_epoch(&swarm, "sealed") > epoch
    });
    swarm.wait("h2 left no tunnel behind", CONVERGE, || !has_link(&swarm, 2, DEVICE));
    // IPsec moves to the new key a few seconds after every node has it:
    // the streams run across that too.
    let rounds = if ipsec { 12 } else { 4 };
    for round in 0..rounds {
        stream.echo(&format!("after rotation {round}"));
        if let Some(s) = esp_stream.as_mut() {
            s.echo(&format!("ipsec after rotation {round}"));
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    // New connections use the new keys.
    let m = format!("{MARKER}-new");
    let back = in_task(&swarm, 0, &secret_h0, move || echo_line(secret_h1, &m));
    assert_eq!(back, Ok(format!("{MARKER}-new")));
    drop(stream);
    if let Some(mut s) = esp_stream {
        swarm.wait("h0 sends to h1 with the new key", CONVERGE, || {
            let now = outbound_to_h1(esp_sas(&swarm, 0));
            now.len() == 1 && now != esp_before
        });
        s.echo("ipsec with the new key");
        let sas = esp_sas(&swarm, 0);
        assert!(
            sas.iter().all(|(src, dst, _)| *src != host_ip(2) && *dst != host_ip(2)),
            "the removed node's associations are gone: {sas:?}"
        );
        assert!(esp_sas(&swarm, 2).is_empty(), "h2 left no IPsec state behind");
    } else {
        // Without ESP, a task on an IPsec network is refused rather than
        // sent in clear.
        swarm.ok(0, &["network", "create", "--opt", "encrypted=ipsec", "esp"]);
        swarm.ok(
            0,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                "ipsec",
                "--network",
                "esp",
                "--",
                "sleep",
                "1000",
            ],
        );
        swarm.wait("the IPsec network's task refused", CONVERGE, || {
            swarm.ok(0, &["service", "ps", "ipsec"]).contains("IPsec")
        });
    }

    // Leaving removes the tunnel and IPsec with the networks.
    swarm.ok(1, &["swarm", "leave"]);
    swarm.wait("h1 without tunnel", CONVERGE, || !has_link(&swarm, 1, DEVICE));
    assert!(overlays_on(&swarm, 1).is_empty());
    if ipsec {
        assert!(esp_sas(&swarm, 1).is_empty(), "h1 left no IPsec state behind");
    }
}

#[test]
#[allow(dead_code, reason = "the VM lane's binary includes this file for the scenario only")]
fn encrypted_overlays_in_userspace_wireguard() {
    require_root();
    encrypted_overlays_hide_the_payload_and_survive_key_rotation(mesh_tests::swarm::AGENT_FLAGS);
}
