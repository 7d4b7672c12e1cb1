//! Kernel lane: the control plane end to end. Real agents in host
//! namespaces, driven by the real meshctl, over mutual TLS on the underlay.

use std::{collections::BTreeSet, time::Duration};

use mesh_tests::{require_root, swarm::Swarm};

const CONVERGE: Duration = Duration::from_secs(30);

/// Every file under the swarm's data directories, as bytes.
fn data_files(swarm: &Swarm) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    let mut out = Vec::new();
    for a in &swarm.agents {
        walk(&a.data_dir, &mut out);
    }
    out
}

fn assert_not_on_disk(swarm: &Swarm, secret: &str) {
    for (path, bytes) in data_files(swarm) {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret:.20}... found in plain text in {path}"
        );
    }
}

fn managers_agree(swarm: &Swarm, managers: &[usize], total: usize) -> bool {
    let views: Vec<_> = managers.iter().map(|m| swarm.nodes(*m)).collect();
    views.iter().all(|v| {
        v.len() == total
            && v.iter().all(|(_, status, _, _)| status == "Ready")
            && v.iter().filter(|n| n.3 == "Leader").count() == 1
            && v.iter().filter(|n| n.3 == "Reachable").count() == managers.len() - 1
    }) && views.windows(2).all(|w| w[0] == w[1])
}

#[test]
fn three_managers_and_two_workers_form_a_swarm_from_the_cli() {
    require_root();
    let swarm = Swarm::new(5);
    let out = swarm.init(&[]);
    assert!(out.contains("Swarm initialized"), "{out}");
    assert!(out.contains("meshctl swarm join --token MESHTKN-1-"), "{out}");
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.join(3, 0, "worker");
    swarm.join(4, 1, "worker"); // through a follower: forwarded to the leader
    swarm.wait("node ls to agree on every manager", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 5)
    });
    let ls = swarm.ok(0, &["node", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(" *") && l.contains("h0")),
        "self is starred:\n{ls}"
    );
    let ids: BTreeSet<String> = swarm.ok(1, &["node", "ls", "-q"]).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 5);

    // A worker cannot read or change cluster state.
    let (code, err) = swarm.fails(3, &["node", "ls"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not a swarm manager"), "{err}");

    // Tokens and keys are nowhere in plain text on any node.
    let worker_token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]);
    let manager_token = swarm.ok(0, &["swarm", "join-token", "-q", "manager"]);
    assert_not_on_disk(&swarm, worker_token.trim());
    assert_not_on_disk(&swarm, manager_token.trim());
    assert_not_on_disk(&swarm, "PRIVATE KEY");
}

#[test]
fn leader_loss_keeps_every_acknowledged_write_and_the_old_leader_catches_up() {
    require_root();
    let mut swarm = Swarm::new(4);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.join(3, 0, "worker");
    swarm.wait("3 managers and a worker", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 4)
    });

    // Writes through a follower; the leader dies after the 10th. Bounded in
    // count (200) and time (30 s).
    let mut acknowledged = Vec::new();
    let mut after_kill = 0;
    let mut last_error = String::new();
    let started = std::time::Instant::now();
    for n in 0..200 {
        if n == 10 {
            swarm.kill(0); // the leader (the node that ran init)
        }
        let label = format!("w{n}=1");
        let out = swarm.meshctl(1, &["node", "update", "--label-add", &label, "h1"]);
        if out.status.success() {
            acknowledged.push(format!("w{n}"));
            after_kill += usize::from(n >= 10);
        } else {
            last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        if after_kill >= 20 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    if after_kill == 0 {
        swarm.dump_logs();
    }
    assert!(
        after_kill > 0,
        "no write committed after the leader died; last error: {last_error}"
    );
    // The worker follows the new leader by itself: it stays Ready while the
    // old leader turns Down.
    swarm.wait("the old leader marked down, the worker still ready", CONVERGE, || {
        let rows = swarm.nodes(1);
        rows.iter().any(|n| n.0 == "h0" && n.1 == "Down") && rows.iter().any(|n| n.0 == "h3" && n.1 == "Ready")
    });
    std::thread::sleep(Duration::from_secs(3)); // several Down periods: h3 keeps heartbeating
    assert!(
        swarm.nodes(1).iter().any(|n| n.0 == "h3" && n.1 == "Ready"),
        "the worker lost the swarm"
    );
    let committed = swarm.applied(1).expect("h1 reports its store");
    swarm.start(0);
    swarm.wait("old leader back, its own store caught up", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 4) && swarm.stores_agree(&[0, 1, 2], committed) && {
            let inspect = swarm.meshctl(0, &["node", "inspect", "h1"]);
            let text = String::from_utf8_lossy(&inspect.stdout).into_owned();
            acknowledged.iter().all(|k| text.contains(&format!("\"{k}\"")))
        }
    });
}

#[test]
fn a_partitioned_manager_cannot_commit_and_converges_after_healing() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.wait("3 managers", CONVERGE, || managers_agree(&swarm, &[0, 1, 2], 3));
    let before = swarm.ok(0, &["node", "ls"]);
    swarm.cluster.partition(2).expect("partition h2");
    let minority = swarm.meshctl(2, &["node", "update", "--label-add", "minority=1", "h2"]);
    assert!(!minority.status.success(), "the minority committed a write");
    assert_eq!(
        minority.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&minority.stderr)
    );
    swarm.ok(0, &["node", "update", "--label-add", "majority=1", "h2"]);
    let committed = swarm.applied(0).expect("h0 reports its store");
    swarm.cluster.heal(2).expect("heal h2");
    swarm.wait("h2's own store caught up", CONVERGE, || {
        swarm.stores_agree(&[0, 1, 2], committed)
    });
    let inspect = swarm.meshctl(2, &["node", "inspect", "h2"]);
    let text = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    assert!(text.contains("\"majority\""), "{text}");
    if text.contains("\"minority\"") {
        swarm.dump_logs();
        panic!(
            "a write refused to the minority was applied later:\n{text}\nbefore the partition:\n{before}\nthe refusal: {}",
            String::from_utf8_lossy(&minority.stderr)
        );
    }
}

#[test]
fn restarted_nodes_rejoin_and_an_autolocked_manager_stays_locked_until_unlocked() {
    require_root();
    let mut swarm = Swarm::new(2);
    let out = swarm.init(&["--autolock"]);
    let key = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("MESHKEY-1-"))
        .expect("init prints the unlock key")
        .to_string();
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);
    assert_not_on_disk(&swarm, &key);

    // A worker restarted with its data directory comes back by itself.
    swarm.kill(1);
    swarm.wait("h1 down", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Down")
    });
    swarm.start(1);
    swarm.wait("h1 ready again", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Ready")
    });

    // The autolocked manager restarts locked.
    swarm.kill(0);
    swarm.start(0);
    assert!(swarm.ok(0, &["info"]).contains("Swarm: locked"));
    let (code, err) = swarm.fails(0, &["node", "ls"]);
    assert_eq!(code, 6, "{err}");
    let wrong = swarm.meshctl_stdin(
        0,
        &["swarm", "unlock"],
        "MESHKEY-1-0000000000000000000000000000000000000000000000000000000000000000\n",
    );
    assert_eq!(
        wrong.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let garbage = swarm.meshctl_stdin(0, &["swarm", "unlock"], "not-a-key\n");
    assert_eq!(garbage.status.code(), Some(2));
    assert!(
        swarm.ok(0, &["info"]).contains("Swarm: locked"),
        "failed unlocks change nothing"
    );
    let right = swarm.meshctl_stdin(0, &["swarm", "unlock"], &format!("{key}\n"));
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    swarm.wait("both nodes ready after unlock", CONVERGE, || swarm.ready(0) == 2);
}

#[test]
fn bad_tokens_and_bad_input_are_refused_and_change_nothing() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    // A second, separate swarm on h1.
    let h1 = swarm.cluster.host(1).address().to_string();
    swarm.ok(1, &["swarm", "init", "--advertise-addr", &h1]);
    let remote = format!("{}:2377", swarm.cluster.host(0).address());
    let h2 = swarm.cluster.host(2).address().to_string();
    let join = |token: &str| {
        swarm.meshctl(
            2,
            &["swarm", "join", "--token", token, "--advertise-addr", &h2, &remote],
        )
    };
    let good = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]).trim().to_string();
    let other = swarm.ok(1, &["swarm", "join-token", "-q", "worker"]).trim().to_string();

    // Right CA, wrong secret.
    let (prefix, _) = good.rsplit_once('-').unwrap();
    let wrong_secret = format!("{prefix}-{}", "0".repeat(good.len() - prefix.len() - 1));
    let out = join(&wrong_secret);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid join token"));
    // Another swarm's token: h0 does not present that CA.
    let out = join(&other);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be verified against the token"));
    // A tampered CA digest.
    let mut tampered = good.clone().into_bytes();
    let at = "MESHTKN-1-".len() + 3;
    tampered[at] = if tampered[at] == b'a' { b'b' } else { b'a' };
    let out = join(std::str::from_utf8(&tampered).unwrap());
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    // Not a token at all.
    let out = join("hello");
    assert_eq!(out.status.code(), Some(2));
    // A node claiming a live member's addresses (h0's, as its data path).
    let h0 = swarm.cluster.host(0).address().to_string();
    let out = swarm.meshctl(
        2,
        &[
            "swarm",
            "join",
            "--token",
            &good,
            "--advertise-addr",
            &h2,
            "--data-path-addr",
            &h0,
            &remote,
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("data path address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing changed: h2 is in no swarm, h0's swarm has one node.
    assert!(swarm.ok(2, &["info"]).contains("Swarm: inactive"));
    assert_eq!(swarm.ok(0, &["node", "ls", "-q"]).lines().count(), 1);
    // A node that leaves is down at once: the same host joins again.
    assert_eq!(join(&good).status.code(), Some(0));
    swarm.wait("h2 ready", CONVERGE, || swarm.ready(0) == 2);
    swarm.ok(2, &["swarm", "leave"]);
    assert!(swarm.nodes(0).iter().any(|n| n.0 == "h2" && n.1 == "Down"));
    let again = join(&good);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    swarm.ok(2, &["swarm", "leave"]);
    let h0_id = mesh_agent::api::objects::node_id_text(swarm.info(0).unwrap().node_id.unwrap());
    for id in swarm.ok(0, &["node", "ls", "-q"]).lines().filter(|id| *id != h0_id) {
        swarm.ok(0, &["node", "rm", id]);
    }
    let rows = swarm.nodes(0);
    assert_eq!(rows.len(), 1, "{rows:?}");

    // Bad CLI input.
    assert_eq!(swarm.fails(0, &["node", "inspect", "nosuchnode"]).0, 3);
    assert_eq!(
        swarm
            .fails(2, &["swarm", "init", "--default-addr-pool", "10.0.0.1/8"])
            .0,
        2
    );
    assert_eq!(swarm.fails(2, &["swarm", "init", "--advertise-addr", "not-an-ip"]).0, 2);
    assert!(swarm.ok(2, &["info"]).contains("Swarm: inactive"));
    let (code, err) = swarm.fails(0, &["node", "demote", "h0"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("last manager"), "{err}");
    assert_eq!(swarm.fails(0, &["node", "update", "--label-add", "=x", "h0"]).0, 2);
    let ls = swarm.nodes(0);
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0].3, "Leader");
}

#[test]
fn promote_demote_leave_and_remove_change_membership() {
    require_root();
    let swarm = Swarm::new(4);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "worker");
    swarm.join(3, 0, "worker");
    swarm.wait("2 managers, 4 nodes", CONVERGE, || managers_agree(&swarm, &[0, 1], 4));

    // Promote a worker: it gets a manager certificate, starts a store and joins the voters.
    assert!(swarm
        .ok(0, &["node", "promote", "h2"])
        .contains("promoted to a manager"));
    swarm.wait("h2 a voting manager", CONVERGE, || {
        managers_agree(&swarm, &[0, 1, 2], 4)
    });
    // Demote the other one back: it leaves the voters and drops its store.
    assert!(swarm.ok(2, &["node", "demote", "h1"]).contains("demoted"));
    swarm.wait("h1 a worker again", CONVERGE, || {
        managers_agree(&swarm, &[0, 2], 4) && !swarm.agents[1].data_dir.join("raft").exists()
    });
    let (code, err) = swarm.fails(1, &["node", "ls"]);
    assert_eq!(code, 4, "{err}");

    // A worker leaves: the managers see it Down; then it can be removed.
    assert!(swarm.ok(3, &["swarm", "leave"]).contains("left the swarm"));
    assert!(swarm.ok(3, &["info"]).contains("Swarm: inactive"));
    swarm.wait("h3 down", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h3" && n.1 == "Down")
    });
    swarm.ok(0, &["node", "rm", "h3"]);
    assert_eq!(swarm.nodes(0).len(), 3);
    // A manager cannot be removed before it is demoted; a live worker needs --force.
    assert!(swarm.fails(0, &["node", "rm", "h2"]).1.contains("demote it first"));
    assert!(swarm.fails(0, &["node", "rm", "h1"]).1.contains("--force"));
    // A manager leaving without --force is refused.
    assert!(swarm.fails(2, &["swarm", "leave"]).1.contains("demote it first"));
}

#[test]
fn ca_rotation_renews_every_certificate_replaces_the_tokens_and_ends() {
    require_root();
    let mut swarm = Swarm::new(3);
    // h2 stays out: it tries the old token after the rotation.
    swarm.init(&[]);
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);
    let old_token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]).trim().to_string();
    let dirs: Vec<_> = swarm.agents.iter().map(|a| a.data_dir.clone()).collect();
    let roots = |i: usize| {
        let text = std::fs::read_to_string(dirs[i].join("certs/ca.pem")).unwrap_or_default();
        text.split_inclusive("-----END CERTIFICATE-----\n")
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let first_root = |i: usize| roots(i).first().cloned().unwrap_or_default();
    let old_root = first_root(0);
    let before = swarm.ok(0, &["swarm", "ca"]);
    assert!(before.contains("No previous root"), "{before}");
    // h1 is away while the root changes: the previous root stays trusted for it.
    swarm.kill(1);
    let out = swarm.ok(0, &["swarm", "ca", "--rotate"]);
    assert!(out.contains("Root CA rotated"), "{out}");
    let new_token = swarm.ok(0, &["swarm", "join-token", "-q", "worker"]).trim().to_string();
    assert_ne!(old_token, new_token);
    let during = swarm.ok(0, &["swarm", "ca"]);
    assert!(
        during.contains("Previous root: sha256:") && during.contains("Nodes not yet renewed:") && during.contains("h1"),
        "{during}"
    );
    swarm.start(1);
    swarm.wait("both nodes renewed under the new root", CONVERGE, || {
        let root = first_root(0);
        !root.is_empty() && root != old_root && first_root(1) == root && swarm.nodes(0).iter().all(|n| n.1 == "Ready")
    });
    // Everyone moved: the previous root is dropped, on every node.
    swarm.wait("the rotation ended", CONVERGE, || {
        swarm.ok(0, &["swarm", "ca"]).contains("No previous root") && roots(0).len() == 1 && roots(1).len() == 1
    });
    // The old token names the old CA: refused.
    let remote = format!("{}:2377", swarm.cluster.host(0).address());
    let h2 = swarm.cluster.host(2).address().to_string();
    let out = swarm.meshctl(
        2,
        &["swarm", "join", "--token", &old_token, "--advertise-addr", &h2, &remote],
    );
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    swarm.ok(
        2,
        &["swarm", "join", "--token", &new_token, "--advertise-addr", &h2, &remote],
    );
    swarm.wait("3 nodes ready", CONVERGE, || swarm.ready(0) == 3);
    // A bad deadline changes nothing.
    let (code, err) = swarm.fails(0, &["swarm", "ca", "--rotate", "--previous-root-ttl", "10s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--previous-root-ttl"), "{err}");
    assert!(swarm.ok(0, &["swarm", "ca"]).contains("No previous root"));
}

mod wire {
    //! Calls made on the cluster port directly, with chosen certificates,
    //! from inside a host namespace.

    use std::{path::Path, time::Duration};

    use mesh_agent::node::NodeConfig;
    use mesh_agent::{
        api::{
            error::ErrorKind,
            messages::{ClusterRequest, PeerRequest, PeerResponse},
            objects::Role,
        },
        ca::{
            keystore::{KeyStore, Loaded},
            pki::{NodeIdentity, NodeKey, RootCa},
        },
        wire::{
            rpc::RpcClient,
            tls::{self, MANAGER_NAME},
        },
    };

    /// A node's certificate, key (opened with its data key) and roots.
    pub struct Identity {
        pub cert: String,
        pub key: String,
        pub roots: Vec<String>,
        pub cluster_id: String,
    }

    pub fn identity(data_dir: &Path) -> Identity {
        let Loaded::Unlocked(dek) = KeyStore::new(data_dir).load().expect("keys") else {
            panic!("locked")
        };
        let key = dek
            .open(
                b"node-key",
                &std::fs::read(data_dir.join("certs/node.key.sealed")).unwrap(),
            )
            .unwrap();
        let ca = std::fs::read_to_string(data_dir.join("certs/ca.pem")).unwrap();
        let config: NodeConfig = serde_json::from_slice(&std::fs::read(data_dir.join("node.json")).unwrap()).unwrap();
        Identity {
            cert: std::fs::read_to_string(data_dir.join("certs/node.pem")).unwrap(),
            key: String::from_utf8(key).unwrap(),
            roots: vec![ca],
            cluster_id: config.cluster_id,
        }
    }

    /// A certificate for a made-up manager, signed by a CA of our own.
    pub fn forged(cluster_id: &str) -> (String, String) {
        let ca = RootCa::generate(cluster_id).unwrap();
        let key = NodeKey::generate().unwrap();
        let now = std::time::SystemTime::now();
        let identity = NodeIdentity {
            node_id: 12345,
            role: Role::Manager,
            cluster_id: cluster_id.into(),
        };
        let cert = ca
            .issue(&key.csr_pem().unwrap(), &identity, now, now + Duration::from_secs(3600))
            .unwrap();
        (cert, key.key_pem().to_string())
    }

    /// One call to `addr` presenting `client` (or nothing), verifying the
    /// server against `roots` as a manager.
    pub fn call(
        addr: &str,
        roots: &[String],
        client: Option<(&str, &str)>,
        request: PeerRequest,
    ) -> Result<PeerResponse, String> {
        let config = tls::client_config(roots, client).map_err(|e| e.to_string())?;
        let rpc: RpcClient<PeerRequest, PeerResponse> =
            RpcClient::new(addr.to_string(), config, MANAGER_NAME.try_into().unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(rpc.call(request, Duration::from_secs(10)))
            .map_err(|e| e.to_string())
    }

    pub fn refused_with(response: Result<PeerResponse, String>, kind: ErrorKind, text: &str) {
        match response {
            Ok(PeerResponse::Refused(e)) | Ok(PeerResponse::Heartbeat(Err(e))) | Ok(PeerResponse::Cluster(Err(e))) => {
                assert_eq!(e.kind, kind, "{e:?}");
                assert!(e.message.contains(text), "{:?} lacks {text:?}", e.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    pub fn node_list() -> PeerRequest {
        PeerRequest::Cluster(ClusterRequest::NodeList)
    }
}

#[test]
fn the_cluster_port_authorizes_every_call_by_its_certificate() {
    use mesh_agent::api::{
        error::ErrorKind,
        messages::{Heartbeat, PeerRequest, PeerResponse},
    };
    require_root();
    let swarm = Swarm::new(3);
    swarm.form_with_workers();
    let manager = format!("{}:2377", swarm.cluster.host(0).address());
    let worker = wire::identity(&swarm.agents[1].data_dir);
    let removed = wire::identity(&swarm.agents[2].data_dir);
    let heartbeat = || {
        PeerRequest::Heartbeat(Heartbeat {
            agent_version: "test".into(),
            raft_ready: false,
            cert_not_after: u64::MAX,
            cert_not_before: 0,
            cert_role: mesh_agent::api::objects::Role::Worker,
            cert_ca_digest: String::new(),
            wireguard_key: String::new(),
            resources: Default::default(),
        })
    };

    swarm.cluster.host(1).run(|| {
        // A worker certificate may heartbeat, but not use manager APIs or Raft.
        let as_worker = Some((worker.cert.as_str(), worker.key.as_str()));
        let beat = wire::call(&manager, &worker.roots, as_worker, heartbeat());
        if beat.is_err() {
            swarm.dump_logs();
        }
        assert!(matches!(beat, Ok(PeerResponse::Heartbeat(Ok(_)))), "{beat:?}");
        wire::refused_with(
            wire::call(&manager, &worker.roots, as_worker, wire::node_list()),
            ErrorKind::PermissionDenied,
            "reserved to managers",
        );
        let vote = PeerRequest::Vote(openraft::raft::VoteRequest::new(openraft::Vote::new(99, 12345), None));
        wire::refused_with(
            wire::call(&manager, &worker.roots, as_worker, vote),
            ErrorKind::PermissionDenied,
            "reserved to managers",
        );
        // No certificate at all: only a join is possible.
        wire::refused_with(
            wire::call(&manager, &worker.roots, None, heartbeat()),
            ErrorKind::PermissionDenied,
            "needs a node certificate",
        );
        // A manager certificate from a CA of our own is refused by the TLS layer.
        let (cert, key) = wire::forged(&worker.cluster_id);
        let forged = wire::call(&manager, &worker.roots, Some((&cert, &key)), wire::node_list());
        assert!(forged.is_err(), "a forged certificate was accepted: {forged:?}");
    });

    // A removed node's certificate is revoked.
    swarm.ok(0, &["node", "rm", "--force", "h2"]);
    swarm.cluster.host(2).run(|| {
        let as_removed = Some((removed.cert.as_str(), removed.key.as_str()));
        wire::refused_with(
            wire::call(&manager, &removed.roots, as_removed, heartbeat()),
            ErrorKind::PermissionDenied,
            "was removed",
        );
    });
}

#[test]
fn a_new_manager_catches_up_from_a_snapshot_after_compaction() {
    require_root();
    // Snapshot every 20 entries, keeping 10: the early log is purged.
    const FLAGS: &[&str] = &[
        "--raft-heartbeat",
        "100ms",
        "--raft-election-timeout",
        "500ms",
        "--raft-snapshot-interval",
        "20",
    ];
    let swarm = Swarm::with_flags(2, FLAGS);
    swarm.init(&[]);
    for n in 0..60 {
        swarm.ok(0, &["node", "update", "--label-add", &format!("s{n}=1"), "h0"]);
    }
    let leader = swarm.info(0).and_then(|i| i.raft).expect("h0 reports its store");
    assert!(
        leader.purged_index.is_some_and(|p| p >= 20),
        "the log was compacted: {leader:?}"
    );
    swarm.join(1, 0, "manager");
    let committed = swarm.applied(0).unwrap();
    swarm.wait("h1 a voter with the whole state", CONVERGE, || {
        managers_agree(&swarm, &[0, 1], 2) && swarm.stores_agree(&[0, 1], committed)
    });
    let follower = swarm.info(1).and_then(|i| i.raft).unwrap();
    assert!(
        follower.snapshot_index.is_some_and(|s| s >= 20),
        "h1 installed a snapshot: {follower:?}"
    );
    // h1's own copy is proven above (same applied index, from a snapshot);
    // reads through h1 are forwarded to the leader and see every write.
    let text = swarm.ok(1, &["node", "inspect", "h0"]);
    assert!((0..60).all(|n| text.contains(&format!("\"s{n}\""))));
}

#[test]
fn an_operator_manages_the_swarm_remotely_with_its_own_certificate() {
    require_root();
    let swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.wait("2 managers", CONVERGE, || managers_agree(&swarm, &[0, 1], 2));
    let dir = swarm.agents[2].data_dir.parent().unwrap().join("operator");
    let dir_text = dir.display().to_string();
    let out = swarm.ok(0, &["swarm", "operator-cert", "--name", "alice", "--out", &dir_text]);
    assert!(out.contains("written to"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.join("key.pem")).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // From h2, which is in no swarm: the leader and a follower both answer.
    for via in [0, 1] {
        let host = format!("{}:2377", swarm.cluster.host(via).address());
        let ls = swarm.ok(2, &["--host", &host, "--tls-dir", &dir_text, "node", "ls"]);
        assert_eq!(ls.lines().count(), 3, "{ls}");
        swarm.ok(
            2,
            &[
                "--host",
                &host,
                "--tls-dir",
                &dir_text,
                "node",
                "update",
                "--label-add",
                &format!("via{via}=1"),
                "h1",
            ],
        );
    }
    let inspect = swarm.ok(0, &["node", "inspect", "h1"]);
    assert!(
        inspect.contains("\"via0\"") && inspect.contains("\"via1\""),
        "{inspect}"
    );
    let host0 = format!("{}:2377", swarm.cluster.host(0).address());
    let token = swarm.ok(
        2,
        &[
            "--host",
            &host0,
            "--tls-dir",
            &dir_text,
            "swarm",
            "join-token",
            "worker",
        ],
    );
    assert!(token.contains("MESHTKN-1-") && token.contains(&host0), "{token}");
    // Commands that act on the local node are refused remotely, with the reason.
    let (code, err) = swarm.fails(2, &["--host", &host0, "--tls-dir", &dir_text, "swarm", "leave"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("without --host"), "{err}");
    // Without the files: a clear error.
    let (code, err) = swarm.fails(2, &["--host", &host0, "--tls-dir", "/nonexistent", "node", "ls"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("operator-cert"), "{err}");
    // An operator certificate cannot act as a manager in Raft.
    swarm.cluster.host(2).run(|| {
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        let (cert, key, ca) = (read("cert.pem"), read("key.pem"), read("ca.pem"));
        let vote = mesh_agent::api::messages::PeerRequest::Vote(openraft::raft::VoteRequest::new(
            openraft::Vote::new(99, 12345),
            None,
        ));
        wire::refused_with(
            wire::call(&host0, &[ca], Some((&cert, &key)), vote),
            mesh_agent::api::error::ErrorKind::PermissionDenied,
            "reserved to managers",
        );
    });
}

#[test]
fn a_node_whose_certificate_expired_while_away_is_refused_until_it_rejoins() {
    require_root();
    let mut swarm = Swarm::new(2);
    swarm.init(&["--cert-expiry", "1m"]);
    swarm.join(1, 0, "worker");
    swarm.wait("2 nodes ready", CONVERGE, || swarm.ready(0) == 2);
    // Alive, it renews well before expiry (two thirds of the lifetime).
    let cert = |i: usize| std::fs::read(swarm.agents[i].data_dir.join("certs/node.pem")).unwrap_or_default();
    let first = cert(1);
    swarm.wait("h1 renewed its certificate", Duration::from_secs(70), || {
        cert(1) != first
    });
    // Away for longer than the lifetime: the certificate lapses.
    swarm.kill(1);
    let expires = std::time::Instant::now() + Duration::from_secs(62);
    swarm.wait("h1 down", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Down")
    });
    std::thread::sleep(expires.saturating_duration_since(std::time::Instant::now()));
    swarm.start(1);
    let log = swarm.agents[1].log.clone();
    swarm.wait("h1 explains its expired certificate", CONVERGE, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("certificate expired")
    });
    assert!(
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.1 == "Down"),
        "an expired certificate was honoured"
    );
    // The way back: leave, remove, join again.
    swarm.ok(1, &["swarm", "leave"]);
    swarm.ok(0, &["node", "rm", "h1"]);
    swarm.join(1, 0, "worker");
    swarm.wait("h1 back", CONVERGE, || swarm.ready(0) == 2);
}

#[test]
fn force_new_cluster_recovers_a_swarm_that_lost_its_quorum_for_good() {
    require_root();
    let mut swarm = Swarm::new(3);
    swarm.init(&[]);
    swarm.join(1, 0, "manager");
    swarm.join(2, 0, "manager");
    swarm.wait("3 managers", CONVERGE, || managers_agree(&swarm, &[0, 1, 2], 3));
    swarm.ok(0, &["node", "update", "--label-add", "before=1", "h0"]);
    // Two of three managers gone: no quorum, no writes.
    swarm.kill(1);
    swarm.kill(2);
    let stuck = swarm.meshctl(0, &["node", "update", "--label-add", "stuck=1", "h0"]);
    assert_eq!(
        stuck.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&stuck.stderr)
    );
    // Recover on h0 from its own data.
    swarm.kill(0);
    swarm.start_with(0, &["--force-new-cluster"]);
    swarm.wait("h0 leads alone", CONVERGE, || {
        let rows = swarm.nodes(0);
        rows.len() == 3
            && rows.iter().filter(|n| !n.3.is_empty()).count() == 1
            && rows.iter().any(|n| n.0 == "h0" && n.3 == "Leader")
    });
    swarm.ok(0, &["node", "update", "--label-add", "after=1", "h0"]);
    let inspect = swarm.ok(0, &["node", "inspect", "h0"]);
    assert!(
        inspect.contains("\"before\"") && inspect.contains("\"after\""),
        "state kept: {inspect}"
    );
    assert!(swarm.agents[0]
        .data_dir
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("raft.before-force-")));
    // An old manager coming back with its old store cannot disturb the new
    // one: it is a worker now, drops its store, and can be promoted again.
    swarm.start(1);
    swarm.wait("h1 back as a worker without a store", CONVERGE, || {
        swarm
            .nodes(0)
            .iter()
            .any(|n| n.0 == "h1" && n.1 == "Ready" && n.3.is_empty())
            && !swarm.agents[1].data_dir.join("raft").exists()
    });
    swarm.ok(0, &["node", "promote", "h1"]);
    swarm.wait("h1 a voter again", CONVERGE, || {
        swarm.nodes(0).iter().any(|n| n.0 == "h1" && n.3 == "Reachable")
    });
    swarm.ok(1, &["node", "update", "--label-add", "again=1", "h0"]);
}
