//! Names operators give for nodes (`node inspect|update|rm`: an ID, a
//! unique ID prefix, a hostname or `self`) and for secrets, configs,
//! services and networks (a name, an ID or a unique prefix), resolved
//! against a cluster made from the input: every line but the last is a
//! node and a secret (`ID NAME`), the last is what the operator typed.
//!
//! Asserts: a name resolves only to something that exists and that it
//! names (its ID, its hostname or name, or a prefix of its ID); "not found"
//! only when nothing has that name or ID prefix.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    api::{
        error::ErrorKind,
        objects::{node_id_text, Availability, Node, NodeStatus, Role},
        secret::{Blob, Kind},
        store::ClusterState,
    },
    manager::rules::{resolve_blob, resolve_node},
};

fn node(id: u64, hostname: &str) -> Node {
    Node {
        id,
        hostname: hostname.to_string(),
        role: Role::Worker,
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: "192.0.2.1:2377".into(),
        data_path_addr: "192.0.2.1".into(),
        status: NodeStatus::Ready,
        status_message: String::new(),
        agent_version: String::new(),
        wireguard_key: String::new(),
        resources: Default::default(),
        certs: Default::default(),
        created_at: 0,
        updated_at: 0,
    }
}

fn secret(id: u64, name: &str) -> Blob {
    Blob {
        id,
        name: name.to_string(),
        labels: BTreeMap::new(),
        data: vec![1],
        created: 0,
        updated: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    let Some(asked) = lines.pop() else {
        return;
    };
    let mut state = ClusterState::default();
    for (i, line) in lines.iter().enumerate().take(8) {
        let (id, name) = line.split_once(' ').unwrap_or(("", line));
        let id = id.parse().unwrap_or(i as u64);
        state.nodes.insert(id, node(id, name));
        state.secrets.insert(id, secret(id, name));
    }
    let q = asked.trim();
    let names =
        |id: u64, name: &str| node_id_text(id) == q || name == q || (!q.is_empty() && node_id_text(id).starts_with(q));

    match resolve_node(&state, asked) {
        Ok(id) => {
            let n = state.nodes.get(&id).expect("resolved to a node that exists");
            assert!(names(id, &n.hostname), "{asked:?} resolved to {n:?}");
        }
        Err(e) if e.kind == ErrorKind::NotFound => {
            assert!(
                !state.nodes.values().any(|n| names(n.id, &n.hostname)),
                "{asked:?}: {e}"
            );
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}"),
    }
    match resolve_blob(&state, Kind::Secret, asked) {
        Ok(id) => {
            let b = state.secrets.get(&id).expect("resolved to a secret that exists");
            assert!(names(id, &b.name), "{asked:?} resolved to {b:?}");
        }
        Err(e) if e.kind == ErrorKind::NotFound => {
            assert!(!state.secrets.values().any(|b| names(b.id, &b.name)), "{asked:?}: {e}");
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}"),
    }
});
