//! `cargo xtask demo`: three hosts in network namespaces on one underlay
//! bridge, mesh-ebpf's XDP program attached to each host's link, the hosts
//! reaching each other (ping and TCP), and the packets the program counted.
//!
//! With `--hold` the hosts stay up until Ctrl-C so they can be explored
//! with `ip netns exec NAME ...`.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use mesh_agent::dataplane::ebpf::{EbpfDataplane, XdpAttachMode, XDP_COUNT};
use mesh_common::counters::{Hook, ProtoClass};
use mesh_tests::{cluster::HOST_LINK, require_root, Cluster, Host};

const HOSTS: usize = 3;
const TCP_PORT: u16 = 7000;

fn main() -> Result<()> {
    let hold = std::env::args().skip(1).any(|a| a == "--hold");
    require_root();
    // Ctrl-C waits for the teardown instead of killing the demo mid-way:
    // the signals stay pending until the end (every thread inherits the mask).
    let signals = block_termination_signals();

    println!("== mesh demo: {HOSTS} hosts in network namespaces, joined by an underlay bridge\n");
    let cluster = Cluster::new(HOSTS).context("building the hosts")?;
    for host in cluster.hosts() {
        println!(
            "  host h{}  {:<12} namespace {}",
            host.index(),
            host.address(),
            host.netns().name()
        );
    }
    println!(
        "  underlay bridge {} in namespace {}\n",
        mesh_tests::cluster::UNDERLAY_BRIDGE,
        cluster.underlay().name()
    );

    println!("== attaching mesh-ebpf's `{XDP_COUNT}` (XDP) to {HOST_LINK} on every host");
    let mut dataplanes = Vec::new();
    for host in cluster.hosts() {
        let mut dataplane = EbpfDataplane::load().context("loading mesh-ebpf (is this root?)")?;
        let mode = host.run(|| attach_best(&mut dataplane))?;
        println!("  h{}: {XDP_COUNT} attached in {mode:?} mode", host.index());
        dataplanes.push(dataplane);
    }

    println!("\n== every host pings every other host (3 echo requests each)");
    let mut lost = 0;
    for from in cluster.hosts() {
        for to in cluster.hosts().iter().filter(|h| h.index() != from.index()) {
            let (line, ok) = ping(from, to)?;
            println!("  {line}");
            lost += usize::from(!ok);
        }
    }

    println!("\n== every host opens a TCP connection to an echo server on every other host (port {TCP_PORT})");
    let servers: Vec<TcpListener> = cluster
        .hosts()
        .iter()
        .map(|h| {
            let address = h.address();
            h.run(move || TcpListener::bind((address, TCP_PORT)))
        })
        .collect::<std::io::Result<_>>()
        .context("starting the echo servers")?;
    for from in cluster.hosts() {
        for (to, server) in cluster
            .hosts()
            .iter()
            .zip(&servers)
            .filter(|(h, _)| h.index() != from.index())
        {
            println!("  {}", tcp_echo(from, to, server)?);
        }
    }

    println!("\n== packets {XDP_COUNT} counted on each host's {HOST_LINK} (received traffic, read from its BPF map)");
    println!(
        "  {:<5} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "host", "icmp", "tcp", "udp", "other", "bytes"
    );
    for (host, dataplane) in cluster.hosts().iter().zip(&dataplanes) {
        let counters = dataplane.counters()?;
        let packets = |c| counters.get(Hook::Xdp, c).packets;
        println!(
            "  h{:<4} {:>10} {:>10} {:>10} {:>10} {:>12}",
            host.index(),
            packets(ProtoClass::Icmp),
            packets(ProtoClass::Tcp),
            packets(ProtoClass::Udp),
            packets(ProtoClass::Other),
            counters.total(Hook::Xdp).bytes
        );
    }
    println!("  (icmp: echo requests/replies and IPv6 neighbour discovery; tcp: handshakes and echoes;");
    println!("   other: ARP, and IPv6 multicast reports, whose hop-by-hop header the program does not walk)");

    if hold {
        println!("\nThe hosts stay up. Explore them, e.g.:");
        println!(
            "  ip netns exec {} ping {}",
            cluster.host(0).netns().name(),
            cluster.host(1).address()
        );
        println!(
            "  ip netns exec {} ip -d link show {HOST_LINK}",
            cluster.host(0).netns().name()
        );
        println!("Press Ctrl-C to tear everything down.");
        wait_for(&signals);
    }
    drop(servers);
    drop(dataplanes);
    drop(cluster);
    println!("\n== torn down: namespaces, links and eBPF programs removed");
    if lost > 0 {
        bail!("{lost} host pairs lost pings: the hosts did not all reach each other");
    }
    Ok(())
}

/// Native XDP where the driver supports it, generic otherwise. The
/// attachment lasts as long as the dataplane: dropping it detaches.
fn attach_best(dataplane: &mut EbpfDataplane) -> Result<XdpAttachMode> {
    if let Err(e) = dataplane.attach_xdp(XDP_COUNT, HOST_LINK, XdpAttachMode::Native) {
        eprintln!("  (native XDP unavailable: {e}; using generic)");
        dataplane.attach_xdp(XDP_COUNT, HOST_LINK, XdpAttachMode::Generic)?;
        return Ok(XdpAttachMode::Generic);
    }
    Ok(XdpAttachMode::Native)
}

/// One line of ping's summary, and whether every echo was answered.
fn ping(from: &Host, to: &Host) -> Result<(String, bool)> {
    let mut cmd = Command::new("ping");
    cmd.args(["-c", "3", "-i", "0.2", "-W", "1", "-q"])
        .arg(to.address().to_string());
    let output = from.output(cmd, Duration::from_secs(10))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("no summary from ping");
    let rtt = text
        .lines()
        .find(|l| l.starts_with("rtt"))
        .map(|l| format!(", {l}"))
        .unwrap_or_default();
    let verdict = if output.status.success() { "ok " } else { "LOST" };
    let line = format!(
        "{verdict} h{} -> h{} ({}): {summary}{rtt}",
        from.index(),
        to.index(),
        to.address()
    );
    Ok((line, output.status.success()))
}

fn tcp_echo(from: &Host, to: &Host, server: &TcpListener) -> Result<String> {
    let target = (to.address(), TCP_PORT);
    let mut client = from.run(move || TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)))?;
    let (mut accepted, peer) = server.accept()?;
    let message = format!("hello from h{}", from.index());
    client.write_all(message.as_bytes())?;
    let mut buf = vec![0u8; message.len()];
    accepted.read_exact(&mut buf)?;
    accepted.write_all(&buf)?;
    client.read_exact(&mut buf)?;
    if buf != message.as_bytes() {
        bail!("h{} -> h{}: the echo came back garbled", from.index(), to.index());
    }
    Ok(format!(
        "ok  h{} -> h{} ({}): connected from {peer}, echoed {:?}",
        from.index(),
        to.index(),
        to.address(),
        message
    ))
}

/// Blocks SIGINT and SIGTERM for this thread and every thread it starts.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the mask
    // calls only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits until SIGINT or SIGTERM arrives.
fn wait_for(signals: &libc::sigset_t) {
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set blocked in this thread, as
    // sigwait requires; `signal` is a valid out-pointer.
    unsafe { libc::sigwait(signals, &mut signal) };
}
