//! Kernel lane: what a peer without a client certificate can do to a
//! manager's cluster port. Anyone may connect there (joins come without a
//! certificate), so before a peer is known it gets small frames, deadlines
//! and a capped number of connections: an attacker on another host cannot
//! grow the manager's memory or hold its port.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_tests::{require_root, swarm::Swarm};
use rustls::pki_types::pem::PemObject;

const CONVERGE: Duration = Duration::from_secs(30);

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the agent's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in the agent's status")
}

/// A client TLS configuration that trusts the swarm's CA (`ca_pem`, which
/// is public) and presents no certificate: what a joining node has.
fn anonymous_tls(ca_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("a PEM certificate")).expect("the swarm's CA");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One attacker's connection: TLS without a certificate, then the header
/// of a 60 MiB frame and as much of its first 8 MiB as the manager takes.
/// How long the manager took to close it (`None`: still open after 15 s).
fn slow_frame(to: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Option<Duration> {
    use rustls::pki_types::ServerName;
    let tcp = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect to the cluster port");
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let name = ServerName::try_from(mesh_agent::wire::tls::MANAGER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(tls, name).expect("a TLS client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let started = Instant::now();
    let mut sent = stream.write_all(&(60u32 << 20).to_be_bytes()).is_ok();
    let chunk = vec![0x90u8; 64 * 1024];
    let mut written = 0usize;
    while sent && written < 8 << 20 {
        sent = stream.write_all(&chunk).and_then(|()| stream.flush()).is_ok();
        written += chunk.len();
    }
    let mut buf = [0u8; 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let took = started.elapsed();
    (took < Duration::from_secs(15)).then_some(took)
}

#[test]
fn peers_without_a_certificate_are_bounded_before_they_authenticate() {
    require_root();
    // h0 is the manager, h1 an attacker outside the swarm, h2 an operator.
    let swarm = Swarm::new(3);
    swarm.form(1);
    let dir = swarm.agents[2].data_dir.parent().unwrap().join("operator");
    let dir_text = dir.display().to_string();
    swarm.ok(0, &["swarm", "operator-cert", "--name", "ops", "--out", &dir_text]);
    let manager = SocketAddr::new(swarm.cluster.host(0).address().into(), 2377);
    let host = manager.to_string();
    let node_ls = || {
        let started = Instant::now();
        let out = swarm.meshctl(2, &["--host", &host, "--tls-dir", &dir_text, "node", "ls"]);
        (
            out.status.success(),
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pid = swarm.pid(0).expect("h0's agent runs");
    let ca = std::fs::read(swarm.agents[0].data_dir.join("certs/ca.pem")).expect("the swarm's CA certificate");
    let tls = anonymous_tls(&ca);
    swarm.wait("the operator is served", CONVERGE, || node_ls().0);

    // 20 connections, each sending the first 8 MiB of a 60 MiB frame.
    let before = rss_kib(pid);
    let closed: Vec<Option<Duration>> = swarm.cluster.host(1).run(|| {
        let attackers: Vec<_> = (0..20)
            .map(|_| {
                let tls = tls.clone();
                std::thread::spawn(move || slow_frame(manager, tls))
            })
            .collect();
        attackers.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let after = rss_kib(pid);
    let slowest = closed.iter().flatten().max().copied();
    println!(
        "20 slow 60 MiB frames: the manager's RSS {before} -> {after} KiB (+{} KiB), every connection closed \
         within {slowest:?}",
        after.saturating_sub(before)
    );
    assert!(
        closed.iter().all(Option::is_some),
        "a connection stayed open: {closed:?}"
    );
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "the manager grew by {} KiB",
        after - before
    );

    // 1,000 connections that never say anything: the manager keeps serving.
    let held: Vec<TcpStream> = swarm.cluster.host(1).run(|| {
        (0..1000)
            .filter_map(|_| TcpStream::connect_timeout(&manager, Duration::from_secs(2)).ok())
            .collect()
    });
    let (served, took, err) = node_ls();
    println!(
        "with {} silent connections from one host open, `node ls` through the cluster port took {took:?}",
        held.len()
    );
    assert!(served, "node ls with 1,000 silent connections: {err}");
    // Those past the per-address cap on unauthenticated connections were
    // closed at once.
    let mut open = 0;
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 1];
        if matches!(c.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    println!("{open} of them were still open");
    assert!(
        open <= mesh_agent::wire::rpc::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        "{open} connections from one address were kept"
    );
    let log = std::fs::read_to_string(&swarm.agents[0].log).unwrap();
    assert!(
        log.contains("too many unauthenticated connections from one address"),
        "the manager says why it refused"
    );
}
