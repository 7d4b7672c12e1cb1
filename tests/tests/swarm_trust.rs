//! Kernel lane: the cluster port trusts the store, not a certificate's
//! fields. A manager that was demoted keeps, on its disk, the manager
//! certificate it had; with it, an attacker who has that disk calls the
//! leader directly (as `meshctl` or a node would) and is refused the
//! manager's calls: the cluster API (join tokens, services), forwarding
//! in another node's name (its assignments, keys, a certificate issued to
//! it) and other nodes' logs. Once the node is removed, its certificate
//! gets nothing at all.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use mesh_agent::{
    api::{
        error::ErrorKind,
        messages::{ClusterRequest, Heartbeat, LogQuery, Origin, PeerRequest, PeerResponse},
        objects::{NodeId, Role},
        service::{TaskReport, TaskState},
    },
    ca::{
        keystore::{KeyStore, Loaded},
        pki,
    },
    wire::{
        rpc::{RpcClient, RpcError},
        tls::{self, MANAGER_NAME},
    },
};
use mesh_tests::{require_root, swarm::Swarm};
use rustls::pki_types::{pem::PemObject, ServerName};

const CONVERGE: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(10);

type Client = RpcClient<PeerRequest, PeerResponse>;

/// A client of `to` with the node credentials in `data_dir` as they are
/// on its disk now (the key opened with the node's own key files, as
/// anyone holding the disk of a node without autolock can).
fn client_with_disk_of(data_dir: &Path, to: Ipv4Addr) -> Client {
    let Loaded::Unlocked(dek) = KeyStore::new(data_dir).load().expect("the node's key files") else {
        panic!("the node is autolocked");
    };
    let certs = data_dir.join("certs");
    let key = dek
        .open(b"node-key", &std::fs::read(certs.join("node.key.sealed")).unwrap())
        .expect("open the node key");
    let key = String::from_utf8(key).unwrap();
    let cert = std::fs::read_to_string(certs.join("node.pem")).unwrap();
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let config = tls::client_config(&[ca], Some((&cert, &key))).expect("a TLS client");
    RpcClient::new(
        format!("{to}:2377"),
        config,
        ServerName::try_from(MANAGER_NAME).unwrap(),
    )
}

/// The serial of the node certificate on `data_dir`'s disk.
fn serial_on_disk(data_dir: &Path) -> String {
    let pem = std::fs::read_to_string(data_dir.join("certs/node.pem")).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    pki::serial_of(&der).expect("a serial")
}

/// Copies what a thief of `data_dir` would take (certificates and keys).
fn steal(data_dir: &Path, to: &Path) {
    for sub in ["certs", "keys"] {
        let from = data_dir.join(sub);
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(sub).join(entry.file_name())).unwrap();
        }
    }
}

/// One call from host `host`'s namespace.
fn call_from(swarm: &Swarm, host: usize, client: Client, request: PeerRequest) -> Result<PeerResponse, RpcError> {
    swarm.cluster.host(host).run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client.call(request, CALL))
    })
}

fn heartbeat() -> PeerRequest {
    PeerRequest::Heartbeat(Heartbeat {
        agent_version: mesh_agent::VERSION.to_string(),
        raft_ready: false,
        cert_not_after: 0,
        cert_not_before: 0,
        cert_role: Role::Worker,
        cert_ca_digest: String::new(),
        wireguard_key: String::new(),
        resources: Default::default(),
    })
}

fn node_id(swarm: &Swarm, host: usize) -> NodeId {
    let info = swarm.info(host).expect("the node's info");
    info.node_id.expect("the node is in a swarm")
}

/// Whether `response` is a refusal of kind PermissionDenied (exit code 5).
fn denied(response: &Result<PeerResponse, mesh_agent::wire::rpc::RpcError>) -> Option<String> {
    match response {
        Ok(PeerResponse::Refused(e)) if e.kind == ErrorKind::PermissionDenied => Some(e.message.clone()),
        Ok(PeerResponse::Cluster(Err(e))) if e.kind == ErrorKind::PermissionDenied => Some(e.message.clone()),
        _ => None,
    }
}

#[test]
fn a_demoted_or_removed_managers_old_certificate_gets_nothing_a_manager_would() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    // Every manager a Raft voter, as every manager's `node ls` shows.
    swarm.wait("3 managers, each a voter", CONVERGE, || {
        (0..3).all(|m| {
            let view = swarm.nodes(m);
            view.len() == 3
                && view.iter().filter(|n| n.3 == "Leader").count() == 1
                && view.iter().filter(|n| n.3 == "Reachable").count() == 2
        })
    });
    let leader = swarm.cluster.host(0).address();
    let (h1, h2) = (node_id(&swarm, 1), node_id(&swarm, 2));
    let h1_serial = serial_on_disk(&swarm.agents[1].data_dir);
    // The calls, from h2's manager certificate as its disk holds it now.
    let stale_dir = swarm.agents[2].data_dir.parent().unwrap().join("stolen");
    steal(&swarm.agents[2].data_dir, &stale_dir);
    // The calls, made from h2's host (not a member's socket: a client of
    // its own, with the stolen credentials).
    let manager_calls = |client: Client| {
        let h1_serial = h1_serial.clone();
        swarm.cluster.host(2).run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                vec![
                    (
                        "Cluster (the manager join token)",
                        client
                            .call(
                                PeerRequest::Cluster(ClusterRequest::JoinToken {
                                    role: Role::Manager,
                                    rotate: false,
                                }),
                                CALL,
                            )
                            .await,
                    ),
                    (
                        "Forwarded (h1's assignments)",
                        client
                            .call(
                                PeerRequest::Forwarded {
                                    origin: Origin {
                                        identity: Some((h1, Role::Manager)),
                                        operator: None,
                                        serial: h1_serial.clone(),
                                        ip: leader.into(),
                                    },
                                    request: Box::new(PeerRequest::Assignments {
                                        known: String::new(),
                                        holds: Vec::new(),
                                    }),
                                },
                                CALL,
                            )
                            .await,
                    ),
                    (
                        "ReadLogs",
                        client
                            .call(
                                PeerRequest::ReadLogs(LogQuery {
                                    tasks: Vec::new(),
                                    tail: None,
                                }),
                                CALL,
                            )
                            .await,
                    ),
                ]
            })
        })
    };
    // While h2 is a manager, its certificate is a manager's.
    for (what, response) in manager_calls(client_with_disk_of(&stale_dir, leader)) {
        let served = matches!(
            response,
            Ok(PeerResponse::Cluster(Ok(_)) | PeerResponse::Assignments(Ok(_)) | PeerResponse::Logs(Ok(_)))
        );
        assert!(served, "{what} while h2 is a manager: {response:?}");
    }

    // A voter forwarding in another node's name must name the certificate
    // the store holds for it: a forged origin gets nothing.
    let forged = PeerRequest::Forwarded {
        origin: Origin {
            identity: Some((h1, Role::Manager)),
            operator: None,
            serial: "00ff".into(),
            ip: leader.into(),
        },
        request: Box::new(PeerRequest::Assignments {
            known: String::new(),
            holds: Vec::new(),
        }),
    };
    let response = call_from(&swarm, 2, client_with_disk_of(&stale_dir, leader), forged);
    let why = denied(&response).unwrap_or_else(|| panic!("a forged origin: {response:?}"));
    assert!(why.contains("replaced by one issued"), "{why}");

    // Demoted: the certificate on the stolen disk still says manager.
    swarm.ok(0, &["node", "demote", "h2"]);
    swarm.wait("h2 a worker", CONVERGE, || {
        swarm
            .nodes(0)
            .iter()
            .any(|(name, _, _, manager)| name == "h2" && manager.is_empty())
    });
    for (what, response) in manager_calls(client_with_disk_of(&stale_dir, leader)) {
        let why =
            denied(&response).unwrap_or_else(|| panic!("{what} with a demoted manager's certificate: {response:?}"));
        println!("{what}: refused: {why}");
    }

    // Still a member: its reports that change nothing write nothing (100
    // calls of 1,000 reports each; each was a Raft write of its own).
    let before = swarm.applied(0).expect("h0's applied index");
    let stolen = client_with_disk_of(&stale_dir, leader);
    let answered = swarm.cluster.host(2).run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut answered = 0;
            for call in 0..100u64 {
                let reports = (0..1000)
                    .map(|i| TaskReport {
                        task: call * 1000 + i,
                        state: TaskState::Running,
                        message: "x".repeat(100),
                    })
                    .collect();
                if let Ok(PeerResponse::Reported(Ok(()))) = stolen.call(PeerRequest::ReportTasks(reports), CALL).await {
                    answered += 1;
                }
            }
            answered
        })
    });
    let after = swarm.applied(0).expect("h0's applied index");
    println!("100 calls of 1,000 reports that change nothing: the log went from {before} to {after}");
    assert_eq!(answered, 100, "the calls were taken");
    assert!(
        after - before < 5,
        "{} writes for reports that change nothing",
        after - before
    );

    // Removed: not even a worker's calls.
    swarm.ok(0, &["node", "rm", "--force", "h2"]);
    swarm.wait("h2 gone", CONVERGE, || {
        swarm.nodes(0).iter().all(|(name, ..)| name != "h2")
    });
    let response = call_from(&swarm, 2, client_with_disk_of(&stale_dir, leader), heartbeat());
    let why = denied(&response).unwrap_or_else(|| panic!("a heartbeat from a removed node: {response:?}"));
    println!("heartbeat from the removed node: refused: {why}");
    // Nor a certificate renewed in its name.
    let csr_pem = pki::NodeKey::generate().unwrap().csr_pem().unwrap();
    let response = call_from(
        &swarm,
        2,
        client_with_disk_of(&stale_dir, leader),
        PeerRequest::RenewCertificate { csr_pem },
    );
    let why = denied(&response).unwrap_or_else(|| panic!("a renewal for a removed node: {response:?}"));
    assert!(why.contains("removed"), "{why}");
    let _ = h2;
}

#[test]
fn a_replaced_node_certificate_and_a_revoked_operator_certificate_are_refused() {
    require_root();
    let swarm = Swarm::new(3);
    // Short certificates: the grace a renewed node's old certificate keeps
    // (the clock skew certificates absorb, a tenth of their lifetime) is 12 s.
    swarm.init(&["--cert-expiry", "2m"]);
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);
    let leader = swarm.cluster.host(0).address();
    let stolen = swarm.agents[1].data_dir.parent().unwrap().join("stolen-worker");
    steal(&swarm.agents[1].data_dir, &stolen);
    let old_serial = serial_on_disk(&stolen);
    let response = call_from(&swarm, 2, client_with_disk_of(&stolen, leader), heartbeat());
    assert!(
        matches!(response, Ok(PeerResponse::Heartbeat(Ok(_)))),
        "the worker's current certificate: {response:?}"
    );

    // Promoted, h1 gets a manager's certificate; its worker certificate is
    // replaced and, once the grace is over, refused for every call.
    swarm.ok(0, &["node", "promote", "h1"]);
    swarm.wait("h1 renewed", CONVERGE, || {
        serial_on_disk(&swarm.agents[1].data_dir) != old_serial
    });
    let mut why = String::new();
    swarm.wait("the replaced certificate refused", Duration::from_secs(60), || {
        let response = call_from(&swarm, 2, client_with_disk_of(&stolen, leader), heartbeat());
        match denied(&response) {
            Some(w) => {
                why = w;
                true
            }
            None => false,
        }
    });
    println!("the replaced worker certificate: refused: {why}");
    assert!(why.contains("replaced by one issued"), "{why}");
    // h1 itself carries on with its new certificate: a voter, its
    // requests forwarded to the leader are served.
    swarm.wait("h1 a manager that forwards", CONVERGE, || {
        swarm.meshctl(1, &["node", "ls"]).status.success()
    });

    // Operator certificates are records: listed, one per name, revoked at once.
    let dir = swarm.agents[2].data_dir.parent().unwrap().join("alice");
    let dir_text = dir.display().to_string();
    swarm.ok(0, &["swarm", "operator-cert", "--name", "alice", "--out", &dir_text]);
    let host0 = format!("{leader}:2377");
    let remote = ["--host", host0.as_str(), "--tls-dir", dir_text.as_str()];
    let ls = swarm.ok(2, &[&remote[..], &["node", "ls"]].concat());
    assert_eq!(ls.lines().count(), 3, "{ls}");
    let listed = swarm.ok(0, &["swarm", "operator-cert", "ls"]);
    assert!(listed.contains("alice") && listed.contains("valid"), "{listed}");
    let other = swarm.agents[2].data_dir.parent().unwrap().join("alice-2");
    let (code, err) = swarm.fails(
        0,
        &[
            "swarm",
            "operator-cert",
            "--name",
            "alice",
            "--out",
            &other.display().to_string(),
        ],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("operator-cert rm alice"), "{err}");
    swarm.ok(0, &["swarm", "operator-cert", "rm", "alice"]);
    let (code, err) = swarm.fails(2, &[&remote[..], &["node", "ls"]].concat());
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("revoked"), "{err}");
    let (code, err) = swarm.fails(0, &["swarm", "operator-cert", "rm", "alice"]);
    assert_eq!(code, 3, "{err}");
    assert!(!swarm.ok(0, &["swarm", "operator-cert", "ls"]).contains("alice"));
    // Revoked through a follower as well: h1 forwards the call, the leader refuses it.
    let host1 = format!("{}:2377", swarm.cluster.host(1).address());
    let via_follower = ["--host", host1.as_str(), "--tls-dir", dir_text.as_str()];
    let (code, err) = swarm.fails(2, &[&via_follower[..], &["node", "ls"]].concat());
    assert_eq!(code, 5, "{err}");
}
