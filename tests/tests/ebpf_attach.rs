//! Kernel lane: every program in mesh-ebpf passes the host kernel's verifier
//! and attaches where the agent will attach it (XDP generic and native on a
//! veth, TC through tcx and through clsact), and counts real traffic there;
//! pinned maps are taken over by an agent of the same version and replaced
//! when another version left them in another shape.

use std::{net::UdpSocket, time::Duration};

use mesh_agent::dataplane::ebpf::{EbpfDataplane, ProgramKind, TcApi, TcDirection, XdpAttachMode, TC_COUNT};
use mesh_common::counters::{Hook, ProtoClass};
use mesh_tests::{cluster::HOST_LINK, require_root, Cluster};

/// Sends `count` UDP datagrams from host 0 to host 1 and waits for them.
fn send_udp(cluster: &Cluster, count: usize) {
    let (from, to) = (cluster.host(0), cluster.host(1));
    let (from_addr, to_addr) = (from.address(), to.address());
    let rx = to.run(move || UdpSocket::bind((to_addr, 0)).expect("bind in host 1"));
    rx.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let tx = from.run(move || UdpSocket::bind((from_addr, 0)).expect("bind in host 0"));
    let target = rx.local_addr().expect("addr");
    let mut buf = [0u8; 16];
    for i in 0..count {
        tx.send_to(b"count me", target).expect("send");
        rx.recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} from host 0 never reached host 1: {e}"));
    }
}

/// The programs of one kind in the object; fails the test if there is none.
fn programs_of(dataplane: &EbpfDataplane, kind: ProgramKind) -> Vec<String> {
    let names: Vec<String> = dataplane
        .program_names()
        .into_iter()
        .filter(|n| dataplane.program_kind(n).ok() == Some(kind))
        .collect();
    assert!(!names.is_empty(), "mesh-ebpf has no {kind:?} program");
    names
}

/// UDP packets the programs counted so far at `hook`.
fn udp_packets(dataplane: &EbpfDataplane, hook: Hook) -> u64 {
    dataplane
        .counters()
        .expect("read counters")
        .get(hook, ProtoClass::Udp)
        .packets
}

#[test]
fn every_program_passes_the_verifier() {
    require_root();
    let dataplane = EbpfDataplane::load().expect("load every mesh-ebpf program into the kernel");
    let names = dataplane.program_names();
    assert!(!names.is_empty(), "the mesh-ebpf object holds no program");
    for name in &names {
        dataplane.program_kind(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        dataplane
            .program_fd(name)
            .unwrap_or_else(|e| panic!("{name} was not loaded: {e}"));
    }
}

#[test]
fn xdp_programs_attach_in_generic_and_native_mode_and_count_traffic() {
    require_root();
    let cluster = Cluster::new(2).expect("build a 2-host cluster");
    let mut dataplane = EbpfDataplane::load().expect("load mesh-ebpf");
    let xdp = programs_of(&dataplane, ProgramKind::Xdp);
    for name in &xdp {
        for mode in [XdpAttachMode::Generic, XdpAttachMode::Native] {
            let before = udp_packets(&dataplane, Hook::Xdp);
            let attachment = cluster
                .host(1)
                .run(|| dataplane.attach_xdp(name, HOST_LINK, mode))
                .unwrap_or_else(|e| panic!("attach {name} in {mode:?} mode: {e}"));
            send_udp(&cluster, 5);
            let after = udp_packets(&dataplane, Hook::Xdp);
            assert!(
                after >= before + 5,
                "{name} in {mode:?} mode counted {} UDP packets for 5 received",
                after - before
            );
            cluster
                .host(1)
                .run(|| dataplane.detach_xdp(name, attachment))
                .expect("detach");
        }
    }
}

#[test]
fn tc_programs_attach_through_tcx_and_clsact_and_count_traffic() {
    require_root();
    let cluster = Cluster::new(2).expect("build a 2-host cluster");
    let mut dataplane = EbpfDataplane::load().expect("load mesh-ebpf");
    let classifiers = programs_of(&dataplane, ProgramKind::TcClassifier);
    for name in &classifiers {
        for api in [TcApi::Tcx, TcApi::Clsact] {
            let before = udp_packets(&dataplane, Hook::Tc);
            let attachments = cluster.host(1).run(|| {
                [TcDirection::Ingress, TcDirection::Egress]
                    .map(|direction| dataplane.attach_tc(name, HOST_LINK, direction, api))
            });
            let attachments: Vec<_> = attachments
                .into_iter()
                .map(|a| a.unwrap_or_else(|e| panic!("attach {name} through {api:?}: {e}")))
                .collect();
            // Every classifier attaches both ways; the counting one counts
            // (the routing mesh's have their own fixtures and scenarios:
            // tc_tunnel, on a link that is no tunnel, rightly drops all).
            if name == TC_COUNT {
                send_udp(&cluster, 5);
                let after = udp_packets(&dataplane, Hook::Tc);
                assert!(
                    after >= before + 5,
                    "{name} through {api:?} counted {} UDP packets for 5 received",
                    after - before
                );
            }
            for attachment in attachments {
                cluster
                    .host(1)
                    .run(|| dataplane.detach_tc(name, attachment))
                    .expect("detach");
            }
        }
    }
}

/// A bpffs mounted under a fresh directory, unmounted and removed on drop.
struct TempPins(std::path::PathBuf);

impl Drop for TempPins {
    fn drop(&mut self) {
        mesh_agent::agent::mesh::bpffs::unmount(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pinned_map_of_another_shape_is_replaced_and_one_of_the_same_is_taken_over() {
    use aya::maps::{Map, MapInfo};
    use mesh_common::lb::{NODES_MAP, PINNED_MAPS, SERVICES_MAP, TASK_LINKS_MAP};
    require_root();
    let data = std::env::temp_dir().join(format!("mesh-pins-{}", std::process::id()));
    let guard = TempPins(data.clone());
    let pins = mesh_agent::agent::mesh::bpffs::pin_dir(&guard.0).expect("mount a bpffs");
    // An earlier agent whose task-links map had another capacity: its
    // nodes map (same key and value, a quarter of the entries) pinned
    // under that name.
    let mut earlier = EbpfDataplane::load().expect("load");
    let Some(Map::HashMap(stale)) = earlier.take_map(NODES_MAP) else {
        panic!("{NODES_MAP} is a hash map")
    };
    stale.pin(pins.join(TASK_LINKS_MAP)).expect("pin the stale map");
    let stale_id = MapInfo::from_pin(pins.join(TASK_LINKS_MAP)).unwrap().id();
    drop(earlier);

    let first = EbpfDataplane::load_pinned(Some(&pins), &PINNED_MAPS).expect("load over the stale pin");
    let info = MapInfo::from_pin(pins.join(TASK_LINKS_MAP)).expect("pinned anew");
    assert_ne!(info.id(), stale_id, "the stale map was replaced");
    assert_eq!(info.max_entries(), mesh_common::lb::MAX_TASK_LINKS);
    let services = MapInfo::from_pin(pins.join(SERVICES_MAP)).unwrap().id();
    drop(first);
    // The next agent of the same version takes every map over as it is.
    let _second = EbpfDataplane::load_pinned(Some(&pins), &PINNED_MAPS).expect("load again");
    assert_eq!(MapInfo::from_pin(pins.join(SERVICES_MAP)).unwrap().id(), services);
    assert_eq!(MapInfo::from_pin(pins.join(TASK_LINKS_MAP)).unwrap().id(), info.id());
}
