//! VM lane: the agent's IPVS layer (dataplane/ipvs.rs) in Debian's kernel
//! (the host's has no IPVS). Host 0 directs a TCP virtual service on its
//! address to two real servers, hosts 1 and 2, in masquerade mode; host 3
//! is the client. Both real servers answer; a real server that is to go is
//! drained at weight 0 (new connections avoid it) and deleted once idle;
//! wanting nothing removes everything.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use mesh_agent::dataplane::ipvs::{self, Dest, DestId, Ipvs, IpvsState, Service, ServiceId};
use mesh_tests::{cluster::host_address, require_root, Cluster};

const PORT: u16 = 80;

fn sh(cluster: &Cluster, host: usize, command: &str) {
    let mut c = Command::new("sh");
    c.args(["-c", command]);
    let out = cluster.host(host).output(c, Duration::from_secs(10)).expect("run sh");
    assert!(
        out.status.success(),
        "host {host}: `{command}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server on `host` that answers each connection with its name.
fn serve(cluster: &Cluster, host: usize) {
    let name = format!("h{host}");
    cluster.host(host).run(move || {
        let listener = TcpListener::bind(("0.0.0.0", PORT)).expect("bind");
        // The thread is born in the host's namespace, so it stays there.
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = s.write_all(name.as_bytes());
            }
        });
    });
}

fn ask(cluster: &Cluster, to: SocketAddr) -> Result<String, String> {
    cluster.host(3).run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
}

fn wanted(vip: ServiceId, backends: &[usize]) -> IpvsState {
    IpvsState::from([(
        vip,
        Service {
            schedule: ipvs::Schedule {
                scheduler: "rr".into(),
                scheduler_flags: 0,
                persistence_s: 0,
            },
            dests: backends
                .iter()
                .map(|h| {
                    (
                        DestId {
                            addr: host_address(*h),
                            port: PORT,
                        },
                        Dest {
                            weight: 1,
                            ..Dest::default()
                        },
                    )
                })
                .collect(),
            ..Service::default()
        },
    )])
}

/// One reconcile on the director, as the agent runs it; what IPVS holds after.
fn reconcile(cluster: &Cluster, want: IpvsState, vip: ServiceId) -> IpvsState {
    cluster.host(0).run(move || {
        let mut x = Ipvs::open().expect("the IPVS family (modprobe ip_vs)");
        let found = x.observe(|id| *id == vip).expect("read IPVS");
        x.apply(&ipvs::plan(&want, &found, |_, _| false)).expect("program IPVS");
        x.observe(|id| *id == vip).expect("read IPVS back")
    })
}

#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn ipvs_masquerades_to_real_servers_and_drains_one_before_removing_it() {
    require_root();
    let load = Command::new("modprobe").arg("ip_vs").output().expect("modprobe");
    assert!(
        load.status.success(),
        "modprobe ip_vs: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let cluster = Cluster::new(4).expect("4 hosts");
    let (director, client) = (host_address(0), host_address(3));
    sh(&cluster, 0, "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects; echo 0 > /proc/sys/net/ipv4/conf/eth0/send_redirects");
    for host in [1, 2] {
        // Masquerade mode: replies go back through the director.
        sh(
            &cluster,
            host,
            &format!("ip route add {client}/32 via {director}; echo 0 > /proc/sys/net/ipv4/conf/all/accept_redirects"),
        );
        serve(&cluster, host);
    }
    let vip = ServiceId::Addr {
        addr: director,
        port: PORT,
        protocol: 6,
    };
    let to = SocketAddr::from((director, PORT));

    let held = reconcile(&cluster, wanted(vip, &[1, 2]), vip);
    assert_eq!(held[&vip].dests.len(), 2);
    let answered: BTreeSet<String> = (0..10).map(|_| ask(&cluster, to).expect("an answer")).collect();
    assert_eq!(
        answered,
        BTreeSet::from(["h1".to_string(), "h2".to_string()]),
        "both real servers answer"
    );

    // Host 2 is to go: weight 0 first, so new connections avoid it.
    let held = reconcile(&cluster, wanted(vip, &[1]), vip);
    let h2 = DestId {
        addr: host_address(2),
        port: PORT,
    };
    let draining = held[&vip].dests.get(&h2).copied();
    let answered: BTreeSet<String> = (0..6).map(|_| ask(&cluster, to).expect("an answer")).collect();
    assert_eq!(
        answered,
        BTreeSet::from(["h1".to_string()]),
        "a draining real server takes no new connection"
    );
    // None: it had no connection left, so it went at once.
    if let Some(d) = draining {
        assert_eq!(d.weight, 0, "drained before it is deleted");
        // Its connections closed: a next pass deletes it.
        let gone = (0..150).any(|_| {
            let held = reconcile(&cluster, wanted(vip, &[1]), vip);
            let gone = !held[&vip].dests.contains_key(&h2);
            if !gone {
                std::thread::sleep(Duration::from_millis(200));
            }
            gone
        });
        assert!(gone, "the drained real server is deleted once idle");
    }

    // Wanting nothing: after draining, the service goes too.
    let mut left = IpvsState::new();
    for _ in 0..150 {
        left = reconcile(&cluster, IpvsState::new(), vip);
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(left.is_empty(), "everything removed: {left:?}");
    assert!(
        ask(&cluster, to).is_err(),
        "nothing answers the virtual service any more"
    );
}
