//! Kernel lane: the cluster harness itself (root; host kernel).
//! Every test builds its own hosts in namespaces and removes them.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use mesh_agent::agent::net::netns::NetNs;
use mesh_tests::{cluster, require_root, Cluster, Host};

/// A UDP socket bound inside `host`, with a short read timeout.
fn udp_socket(host: &Host) -> UdpSocket {
    let address = host.address();
    host.run(move || {
        let socket = UdpSocket::bind((address, 0)).expect("bind a UDP socket in the host");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("set a read timeout");
        socket
    })
}

/// Whether a datagram from `from` reaches `to` within `attempts` tries
/// (each waits for the socket's read timeout). Reachability asserts allow
/// many: the kernel lane starts every scenario at once on two cores, and a
/// first datagram can wait behind neighbour resolution for a while.
///
/// Any probe of this call counts: a probe held back by neighbour resolution
/// arrives one attempt late, and matching only the latest probe then failed
/// every later attempt at once (seen in CI).
fn reaches(from: &Host, to: &Host, attempts: usize) -> bool {
    let (tx, rx) = (udp_socket(from), udp_socket(to));
    let target: SocketAddr = rx.local_addr().expect("local address");
    let sender = tx.local_addr().expect("local address");
    let mut buf = [0u8; 64];
    (0..attempts).any(|i| {
        tx.send_to(format!("probe {i}").as_bytes(), target)
            .expect("send inside the cluster");
        matches!(rx.recv_from(&mut buf), Ok((n, peer)) if peer == sender && buf[..n].starts_with(b"probe "))
    })
}

fn links_in_root_namespace() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("list root namespace links")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn harness_namespaces_of(prefix_pid: u32) -> Vec<String> {
    let prefix = format!("{}{prefix_pid}-", cluster::PREFIX);
    NetNs::list()
        .expect("list namespaces")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn every_host_reaches_every_other_over_the_underlay() {
    require_root();
    let cluster = Cluster::new(3).expect("build a 3-host cluster");
    for from in cluster.hosts() {
        for to in cluster.hosts() {
            if from.index() != to.index() {
                assert!(
                    reaches(from, to, 20),
                    "host {} cannot reach host {}",
                    from.index(),
                    to.index()
                );
            }
        }
    }
}

#[test]
fn a_partitioned_host_is_unreachable_until_healed() {
    require_root();
    let cluster = Cluster::new(3).expect("build a 3-host cluster");
    assert!(
        reaches(cluster.host(0), cluster.host(2), 20),
        "reachable before the partition"
    );
    cluster.partition(2).expect("partition host 2");
    assert!(
        !reaches(cluster.host(0), cluster.host(2), 2),
        "host 2 still reachable while partitioned"
    );
    assert!(
        reaches(cluster.host(0), cluster.host(1), 20),
        "the rest of the cluster must stay connected"
    );
    cluster.heal(2).expect("heal host 2");
    assert!(
        reaches(cluster.host(0), cluster.host(2), 20),
        "host 2 unreachable after healing"
    );
}

#[test]
fn processes_run_inside_their_host_and_can_be_killed() {
    require_root();
    let cluster = Cluster::new(2).expect("build a 2-host cluster");
    let host = cluster.host(1);
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let process = host.spawn(sleep).expect("spawn sleep in host 1");
    let inode = |path: String| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat a namespace"));
    let host_ns = inode(format!(
        "{}/{}",
        mesh_agent::agent::net::netns::NETNS_DIR,
        host.netns().name()
    ));
    assert_eq!(
        inode(format!("/proc/{}/ns/net", process.pid())),
        host_ns,
        "the process is not in host 1's namespace"
    );
    assert_ne!(
        inode("/proc/self/ns/net".into()),
        host_ns,
        "the test itself must stay in the root namespace"
    );

    let status = process.kill().expect("kill the process");
    assert!(!status.success(), "a killed process does not exit successfully");

    let mut ip = Command::new("ip");
    ip.args(["-o", "-4", "addr", "show", "dev", cluster::HOST_LINK]);
    let output = host.output(ip, Duration::from_secs(10)).expect("run ip in host 1");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&host.address().to_string()),
        "ip in host 1 shows {stdout:?}, not its address"
    );
}

#[test]
fn output_kills_a_command_that_outlives_its_timeout() {
    require_root();
    let cluster = Cluster::new(1).expect("build a 1-host cluster");
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let started = std::time::Instant::now();
    let output = cluster
        .host(0)
        .output(sleep, Duration::from_millis(200))
        .expect("run sleep");
    assert!(!output.status.success(), "a killed command must not report success");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the timeout did not stop the command"
    );
}

#[test]
fn nothing_is_added_to_the_root_namespace_and_everything_is_removed_on_drop() {
    require_root();
    let before = links_in_root_namespace();
    let names: Vec<String> = {
        let cluster = Cluster::new(2).expect("build a 2-host cluster");
        assert_eq!(
            links_in_root_namespace(),
            before,
            "the cluster added links to the root namespace"
        );
        let mut names: Vec<String> = cluster.hosts().iter().map(|h| h.netns().name().to_owned()).collect();
        names.push(cluster.underlay().name().to_owned());
        names
    };
    let left = NetNs::list().expect("list namespaces");
    for name in &names {
        assert!(!left.contains(name), "{name} survived the cluster's drop");
    }
    assert_eq!(links_in_root_namespace(), before, "root namespace links changed");
}

#[test]
fn a_panicking_test_still_removes_its_namespaces() {
    require_root();
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(2).expect("build a 2-host cluster");
        let name = cluster.host(0).netns().name().to_owned();
        std::panic::panic_any(name);
    });
    let name = *result
        .expect_err("the closure panics")
        .downcast::<String>()
        .expect("the panic carries the name");
    assert!(!NetNs::list().expect("list").contains(&name), "{name} survived a panic");
}

#[test]
fn leftovers_of_a_crashed_run_are_removed_before_a_new_cluster_starts() {
    require_root();
    // No process has a pid above the kernel's maximum (2^22), so this one is dead.
    let dead_pid = 2_147_483_600u32;
    let stale = format!("{}{dead_pid}-0-h0", cluster::PREFIX);
    let _ = NetNs::delete(&stale);
    NetNs::create(&stale).expect("create a stale-looking namespace");
    let _cluster = Cluster::new(1).expect("build a cluster");
    assert!(
        harness_namespaces_of(dead_pid).is_empty(),
        "the stale namespace {stale} was not removed"
    );
}
