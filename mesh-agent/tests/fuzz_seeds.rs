//! The fuzz targets' seed inputs (`fuzz/corpus/<target>/`), made by the
//! real encoders so that they stay what the agent really reads: this test
//! fails when a seed on disk differs from what the encoders make now.
//! `MESH_WRITE_FUZZ_SEEDS=1 cargo test -p mesh-agent --test fuzz_seeds`
//! writes them anew.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use mesh_agent::{
    agent::net::dns::encode_query,
    api::{
        error::{ApiError, ApiResult},
        messages::{
            ClusterRequest, Heartbeat, HeartbeatReply, JoinCall, LocalRequest, LocalResponse, PeerRequest, PeerResponse,
        },
        objects::{node_id_text, Availability, NodeId, Role},
        raft_types::TypeConfig,
        secret::BlobRef,
        service::{ServiceSpec, ServiceUpdate},
        store::Command,
    },
    dataplane::{
        ipvs::{self, DestId, IpvsMessage, Schedule, ServiceId},
        wireguard::{peer_message, PeerChange, TunnelPeer},
        xfrm::{self, Direction, Policy, Sa, SaId},
    },
    wire::rpc::encode_frame,
};
use netlink_packet_core::{
    DoneMessage, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_MULTIPART,
};
use netlink_packet_generic::{GenlFamily, GenlMessage};
use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};
use openraft::{raft::AppendEntriesRequest, CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

/// The request every netlink seed answers (the targets' `SEQUENCE`).
const SEQUENCE: u32 = 1;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

/// Every seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    out.extend(rpc().into_iter().map(|(n, b)| ("rpc", n, b)));
    out.extend(local_api().into_iter().map(|(n, b)| ("local_api", n, b)));
    out.extend(text_seeds());
    out.extend(netlink().into_iter().map(|(n, b)| ("netlink", n, b)));
    out.extend(packet().into_iter().map(|(n, b)| ("packet", n, b)));
    out.extend(dns().into_iter().map(|(n, b)| ("dns", n, b)));
    out
}

fn frame<T: serde::Serialize>(id: u64, message: &T) -> Vec<u8> {
    encode_frame(id, message, usize::MAX).expect("seed messages encode")
}

fn rpc() -> Vec<(&'static str, Vec<u8>)> {
    let node: NodeId = 7;
    let heartbeat = PeerRequest::Heartbeat(Heartbeat {
        agent_version: "0.1.0".into(),
        raft_ready: true,
        cert_not_after: 2_000_000_000,
        cert_not_before: 1_700_000_000,
        cert_role: Role::Manager,
        cert_ca_digest: "ab".repeat(32),
        wireguard_key: "x".repeat(44),
        resources: Default::default(),
    });
    let join = PeerRequest::Join(JoinCall {
        token: format!("MESHTKN-1-{}-{}", "0".repeat(64), "1".repeat(32)),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n".into(),
        hostname: "h1".into(),
        advertise_addr: Some("192.0.2.1:2377".into()),
        listen_port: 2377,
        data_path_addr: None,
        agent_version: "0.1.0".into(),
    });
    let log_id = LogId::new(CommittedLeaderId::new(3, node), 42);
    let append = PeerRequest::AppendEntries(AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, node),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, node), 41)),
        entries: vec![Entry {
            log_id,
            payload: EntryPayload::Normal(Command::SetNodeWireguardKey {
                id: node,
                key: "k".repeat(44),
            }),
        }],
        leader_commit: Some(log_id),
    });
    let vote = PeerRequest::Vote(openraft::raft::VoteRequest::new(Vote::new(4, node), Some(log_id)));
    let cluster = PeerRequest::Cluster(ClusterRequest::NodeInspect { node: "h1".into() });
    let mut spec = ServiceSpec::new("web", vec!["mesh-echo".into(), "--http".into()]);
    spec.secrets.push(BlobRef {
        source: "pw".into(),
        target: "pw".into(),
        uid: 0,
        gid: 0,
        mode: 0o400,
    });
    let create = PeerRequest::Cluster(ClusterRequest::ServiceCreate { spec: Box::new(spec) });
    let reply = PeerResponse::Heartbeat(Ok(HeartbeatReply {
        period_ms: 1000,
        managers: vec![(node, "192.0.2.1:2377".into())],
        leader: Some(node),
        desired_role: Role::Manager,
        renew_certificate: false,
        ca_pems: vec![],
        unlock_key: None,
        availability: Availability::Active,
    }));
    let refused = PeerResponse::Refused(ApiError::denied("a worker cannot call the cluster API"));
    let two = [frame(1, &heartbeat), frame(2, &cluster)].concat();
    vec![
        ("heartbeat", frame(1, &heartbeat)),
        ("join", frame(2, &join)),
        ("append-entries", frame(3, &append)),
        ("vote", frame(4, &vote)),
        ("service-create", frame(5, &create)),
        ("two-requests", two),
        ("heartbeat-reply", frame(1, &reply)),
        ("refused", frame(9, &refused)),
    ]
}

fn local_api() -> Vec<(&'static str, Vec<u8>)> {
    let json = |v: &dyn erased::Json| v.json().into_bytes();
    let ok: ApiResult<LocalResponse> = Ok(LocalResponse::Done);
    let err: ApiResult<LocalResponse> = Err(ApiError::not_found("node x not found"));
    vec![
        ("info", json(&LocalRequest::Info)),
        ("node-ls", json(&LocalRequest::Cluster(ClusterRequest::NodeList))),
        (
            "service-logs",
            json(&LocalRequest::ServiceLogs {
                service: "web".into(),
                cursors: vec![(1, 10)],
                tail: Some(5),
            }),
        ),
        ("done", json(&ok)),
        ("not-found", json(&err)),
    ]
}

/// serde_json over values of different types in one list.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("seed values print")
        }
    }
}

/// The targets whose input is text (with a selector byte where the
/// target takes several kinds).
fn text_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let with = |selector: u8, text: &str| [&[selector][..], text.as_bytes()].concat();
    let mut spec = ServiceSpec::new("web", vec!["sleep".into(), "60".into()]);
    spec.constraints.push("node.role==worker".into());
    spec.configs.push(BlobRef {
        source: "app".into(),
        target: "/etc/app.conf".into(),
        uid: 0,
        gid: 0,
        mode: 0o444,
    });
    let update = ServiceUpdate {
        secret_add: vec!["source=pw,target=db".into()],
        env_add: vec!["A=1".into()],
        ..ServiceUpdate::default()
    };
    let spec_and_update = format!(
        "{}\n{}",
        serde_json::to_string(&spec).expect("a spec prints"),
        serde_json::to_string(&update).expect("an update prints")
    );
    vec![
        (
            "token",
            "join-token",
            format!("MESHTKN-1-{}-{}", "0f".repeat(32), "a1".repeat(16)).into_bytes(),
        ),
        (
            "token",
            "unlock-key",
            format!("MESHKEY-1-{}\n", "5e".repeat(32)).into_bytes(),
        ),
        (
            "token",
            "wireguard-key",
            b"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".to_vec(),
        ),
        ("specs", "publish", with(0, "8080:80")),
        (
            "specs",
            "publish-long",
            with(0, "published=53,target=5353,protocol=udp,mode=host"),
        ),
        ("specs", "constraint", with(1, "node.labels.zone!=b")),
        ("specs", "placement", with(2, "spread=node.labels.zone")),
        ("specs", "env", with(3, "A=1\nPATH=/bin:/usr/bin")),
        (
            "specs",
            "secret",
            with(4, "source=db,target=pw,uid=1000,gid=1000,mode=0400"),
        ),
        ("specs", "config", with(5, "source=app,target=/etc/app.conf")),
        ("specs", "duration", with(6, "90s")),
        ("specs", "node-id", with(7, &node_id_text(0x1234_5678_9abc))),
        ("specs", "service-spec", with(8, &spec_and_update)),
        ("subnet", "subnet", with(0, "10.0.1.0/24")),
        ("subnet", "last-subnet", with(0, "255.255.255.255/32")),
        ("subnet", "pools", with(1, "24\n10.0.0.0/8\n172.16.0.0/12")),
        (
            "subnet",
            "network",
            with(2, "192.168.5.0/24\n192.168.5.254\n192.168.5.128/25"),
        ),
        ("subnet", "address", with(3, "[2001:db8::1]:2377")),
        (
            "rules",
            "nodes",
            format!("1 h1\n2 h2\n{} h1\n{}", u64::MAX, &node_id_text(2)[..12]).into_bytes(),
        ),
        (
            "config_file",
            "agent-toml",
            include_bytes!("../../deploy/agent.toml").to_vec(),
        ),
        // Values that look like flags (once read as the next flag).
        (
            "config_file",
            "values-like-flags",
            b"mesh-routing = \"--to\"\ndata-dir = \"-x\"\nhostname = \"--data-dir\"\n".to_vec(),
        ),
    ]
}

/// A netlink message of `kind` (`flags`, request [`SEQUENCE`]) around `body`.
fn nlmsg(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&SEQUENCE.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

/// A generic netlink dump: the family's messages, then DONE.
fn genl_dump<F>(family_id: u16, payloads: Vec<F>) -> Vec<u8>
where
    F: GenlFamily + std::fmt::Debug + Clone,
    GenlMessage<F>: NetlinkSerializable,
{
    let mut out = Vec::new();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_MULTIPART;
    header.sequence_number = SEQUENCE;
    for payload in payloads {
        let mut genl = GenlMessage::from_payload(payload);
        genl.set_resolved_family_id(family_id);
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        out.extend(bytes);
    }
    let mut done = NetlinkMessage::<GenlMessage<F>>::new(header, NetlinkPayload::Done(DoneMessage::default()));
    done.finalize();
    let mut bytes = vec![0; done.buffer_len()];
    done.serialize(&mut bytes);
    out.extend(bytes);
    out
}

fn netlink() -> Vec<(&'static str, Vec<u8>)> {
    let service = ServiceId::Mark(0x6d00_0001);
    let schedule = Schedule {
        scheduler: "mh".into(),
        scheduler_flags: ipvs::SCHED_MH_PORT,
        persistence_s: 0,
    };
    let dest = DestId {
        addr: Ipv4Addr::new(10, 0, 0, 3),
        port: 80,
    };
    let addr_service = ServiceId::Addr {
        addr: Ipv4Addr::new(192, 0, 2, 1),
        port: 8080,
        protocol: 6,
    };
    let persistent = Schedule {
        scheduler: "rr".into(),
        scheduler_flags: 0,
        persistence_s: 300,
    };
    let ipvs_services: Vec<IpvsMessage> = vec![
        ipvs::message(&ipvs::Change::AddService(service, schedule)),
        ipvs::message(&ipvs::Change::AddService(addr_service, persistent)),
    ];
    let ipvs_dests = vec![ipvs::message(&ipvs::Change::AddDest(service, dest, 3))];
    let peer = TunnelPeer {
        endpoint: SocketAddr::from(([192, 0, 2, 2], 51820)),
        tunnel: Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0, 0, 0, 2),
        psk: [9; 32],
    };
    let device = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![
            WireguardAttribute::IfName("mwg0".into()),
            WireguardAttribute::PrivateKey([1; 32]),
            WireguardAttribute::ListenPort(51820),
            WireguardAttribute::Peers(vec![peer_message(&PeerChange::Set { key: [2; 32], peer })]),
        ],
    };
    let sa_id = SaId {
        src: Ipv4Addr::new(192, 0, 2, 1),
        dst: Ipv4Addr::new(192, 0, 2, 2),
        spi: 0x6d65_0102,
    };
    let (_, sa) = xfrm::message(&xfrm::Change::AddSa(
        sa_id,
        Sa {
            port: 4790,
            key: [3; 20],
        },
    ));
    let policy = Policy {
        direction: Direction::Out,
        local: Ipv4Addr::new(192, 0, 2, 1),
        port: 4790,
    };
    let (_, policy) = xfrm::message(&xfrm::Change::SetPolicy(policy));
    const XFRM_MSG_NEWSA: u16 = 0x10;
    const XFRM_MSG_NEWPOLICY: u16 = 0x13;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    let multi = NLM_F_MULTIPART;
    let xfrm_sas = [
        nlmsg(XFRM_MSG_NEWSA, multi, &sa),
        nlmsg(NLMSG_DONE, multi, &0i32.to_ne_bytes()),
    ]
    .concat();
    let xfrm_policies = [
        nlmsg(XFRM_MSG_NEWPOLICY, multi, &policy),
        nlmsg(NLMSG_DONE, multi, &0i32.to_ne_bytes()),
    ]
    .concat();
    // An ACK and a refusal (ENOENT), each echoing a 16-byte request header.
    let ack = |error: i32| nlmsg(NLMSG_ERROR, 0, &[&error.to_ne_bytes()[..], &[0; 16]].concat());
    let nft_acks = [ack(0), ack(-libc::ENOENT)].concat();
    let with = |selector: u8, bytes: Vec<u8>| [vec![selector], bytes].concat();
    vec![
        ("ipvs-services", with(0x80, genl_dump(0x20, ipvs_services))),
        ("ipvs-dests", with(0x80, genl_dump(0x20, ipvs_dests))),
        ("wireguard-device", with(0x81, genl_dump(0x21, vec![device]))),
        ("xfrm-sas", with(2, xfrm_sas)),
        ("xfrm-policies", with(2, xfrm_policies)),
        ("nftables-acks", with(3, nft_acks)),
    ]
}

fn packet() -> Vec<(&'static str, Vec<u8>)> {
    let ipv4 = |proto: u8| {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&28u16.to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&[192, 0, 2, 100]);
        f[30..34].copy_from_slice(&[192, 0, 2, 1]);
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&8080u16.to_be_bytes());
        f
    };
    let mut ipv6_udp = vec![0u8; 14 + 40 + 8];
    ipv6_udp[12..14].copy_from_slice(&[0x86, 0xdd]);
    ipv6_udp[14] = 0x60;
    ipv6_udp[20] = 17;
    let mut fragment = ipv4(17);
    fragment[20] = 0x20; // more fragments
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    vec![
        ("ipv4-tcp", ipv4(6)),
        ("ipv4-udp", ipv4(17)),
        ("ipv4-icmp", ipv4(1)),
        ("ipv4-fragment", fragment),
        ("ipv6-udp", ipv6_udp),
        ("arp", arp),
    ]
}

fn dns() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("vip", encode_query(1, "web", 1)),
        ("tasks", encode_query(2, "tasks.db", 1)),
        ("aaaa", encode_query(3, "WEB.", 28)),
        ("outside", encode_query(4, "example.com", 1)),
    ]
}

#[test]
fn seeds_are_what_the_encoders_make() {
    let root = corpus();
    let write = std::env::var_os("MESH_WRITE_FUZZ_SEEDS").is_some();
    let seeds = seeds();
    let mut targets: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (target, name, bytes) in &seeds {
        targets.entry(target).or_default().push(name);
        let path = root.join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().expect("a seed is in its target's directory")).unwrap();
            std::fs::write(&path, bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; write the seeds with MESH_WRITE_FUZZ_SEEDS=1", path.display()));
        assert!(
            &on_disk == bytes,
            "{} differs from what the encoders make now; write the seeds anew with MESH_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
    // No stale seed is left behind (a target's corpus is only its seeds).
    for (target, names) in targets {
        let mut found: Vec<String> = std::fs::read_dir(root.join(target))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        expected.sort();
        if write {
            for stale in found.iter().filter(|f| !expected.contains(f)) {
                std::fs::remove_file(root.join(target).join(stale)).unwrap();
            }
        } else {
            assert_eq!(found, expected, "fuzz/corpus/{target} holds exactly the seeds");
        }
    }
}
