//! What operators type into `meshctl service create|update` and friends:
//! `--publish`, `--constraint`, `--placement-pref`, `--env`, `--label`,
//! `--secret`/`--config` references, durations, node IDs, and whole
//! service specs as the cluster API receives them (the first byte picks
//! which; the rest is the text).
//!
//! Asserts: whatever parses prints back (in the flag's own syntax) to text
//! that parses to the same value; parsed values keep their promises (ports
//! are not 0, a reference's file stays in its directory); a spec the
//! manager accepts only holds what the flags' parsers would accept, and an
//! update of it is either refused or accepted again.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mesh_agent::api::{
    clock::parse_duration,
    messages::parse_labels,
    objects::{node_id_text, parse_node_id},
    secret::{self, BlobRef, Kind},
    service::{
        apply_update, parse_env, parse_placement_pref, Constraint, ConstraintKey, PortPublish, Protocol, PublishMode,
        ServiceSpec, ServiceUpdate,
    },
};

fn publish(text: &str) {
    let Ok(p) = PortPublish::parse(text) else {
        return;
    };
    assert!(p.published != 0 && p.target != 0, "{p:?}");
    let mode = match p.mode {
        PublishMode::Ingress => "ingress",
        PublishMode::Host => "host",
    };
    let long = format!(
        "published={},target={},protocol={},mode={mode}",
        p.published,
        p.target,
        p.protocol.name()
    );
    assert_eq!(PortPublish::parse(&long), Ok(p), "{long}");
    if p.mode == PublishMode::Ingress {
        let short = format!("{}:{}/{}", p.published, p.target, p.protocol.name());
        assert_eq!(PortPublish::parse(&short), Ok(p), "{short}");
    }
    assert_eq!(Protocol::from_number(p.protocol.number()), Some(p.protocol));
}

fn constraint(text: &str) {
    let Ok(c) = Constraint::parse(text) else {
        return;
    };
    assert!(!c.value.is_empty() && c.value.trim() == c.value, "{c:?}");
    let key = match &c.key {
        ConstraintKey::NodeId => "node.id".to_string(),
        ConstraintKey::Hostname => "node.hostname".to_string(),
        ConstraintKey::Role => {
            assert!(c.value == "manager" || c.value == "worker", "{c:?}");
            "node.role".to_string()
        }
        ConstraintKey::Label(label) => {
            assert!(!label.is_empty());
            format!("node.labels.{label}")
        }
    };
    let printed = format!("{key}{}{}", if c.equal { "==" } else { "!=" }, c.value);
    assert_eq!(Constraint::parse(&printed), Ok(c), "{printed}");
}

fn placement(text: &str) {
    if let Ok(key) = parse_placement_pref(text) {
        assert!(!key.is_empty());
        assert_eq!(parse_placement_pref(&format!("spread=node.labels.{key}")), Ok(key));
    }
}

/// `--env` and `--label` items, one per line.
fn pairs(text: &str) {
    let items: Vec<String> = text.split('\n').map(str::to_string).collect();
    let print =
        |map: &BTreeMap<String, String>| -> Vec<String> { map.iter().map(|(k, v)| format!("{k}={v}")).collect() };
    if let Ok(env) = parse_env(&items) {
        for k in env.keys() {
            assert!(!k.is_empty() && !k.contains(char::is_whitespace) && !k.starts_with(|c: char| c.is_ascii_digit()));
        }
        assert_eq!(parse_env(&print(&env)), Ok(env));
    }
    if let Ok(labels) = parse_labels(&items) {
        assert!(labels.keys().all(|k| !k.is_empty()));
        assert_eq!(parse_labels(&print(&labels)), Ok(labels));
    }
}

/// The reference in `--secret`/`--config`'s long syntax.
fn print_ref(r: &BlobRef) -> String {
    format!(
        "source={},target={},uid={},gid={},mode={:o}",
        r.source, r.target, r.uid, r.gid, r.mode
    )
}

/// What every reference must be, whoever made it: a valid name, a mode
/// without special bits, and a file in the kind's directory (or, for a
/// config, an absolute path) without `.` or `..` to climb out of it.
fn check_ref(kind: Kind, r: &BlobRef) {
    assert!(secret::check_name(kind, &r.source).is_ok(), "{r:?}");
    assert!(r.mode <= 0o777, "{r:?}");
    let plain = |part: &str| !part.is_empty() && part != "." && part != ".." && !part.contains('\0');
    let in_place = match r.target.strip_prefix('/') {
        Some(path) if kind == Kind::Config => path.split('/').all(plain),
        _ => plain(&r.target) && !r.target.contains('/'),
    };
    assert!(in_place, "{kind:?} target {:?} leaves its directory", r.target);
}

fn reference(kind: Kind, text: &str) {
    let Ok(r) = secret::parse_ref(kind, text) else {
        return;
    };
    check_ref(kind, &r);
    let printed = print_ref(&r);
    assert_eq!(secret::parse_ref(kind, &printed), Ok(r), "{printed}");
}

fn duration(text: &str) {
    if let Ok(d) = parse_duration(text) {
        let printed = format!("{}ms", d.as_millis());
        assert_eq!(parse_duration(&printed), Ok(d), "{printed}");
    }
}

fn node_id(text: &str) {
    if let Some(id) = parse_node_id(text) {
        assert_eq!(node_id_text(id), text, "a node ID has one spelling");
    }
}

/// A spec (JSON) as `service create` sends it, and an update of it.
fn spec(text: &str) {
    let (spec, update) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(spec) = serde_json::from_str::<ServiceSpec>(spec) else {
        return;
    };
    if spec.validate().is_err() {
        return;
    }
    for kind in [Kind::Secret, Kind::Config] {
        for r in spec.refs(kind) {
            check_ref(kind, r);
        }
    }
    for c in &spec.constraints {
        assert!(Constraint::parse(c).is_ok(), "{c:?}");
    }
    let Ok(update) = serde_json::from_str::<ServiceUpdate>(update) else {
        return;
    };
    if let Ok(next) = apply_update(&spec, &update) {
        assert!(next.validate().is_ok(), "an accepted update validates: {next:?}");
        for kind in [Kind::Secret, Kind::Config] {
            for r in next.refs(kind) {
                check_ref(kind, r);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 10 {
        0 => publish(text),
        1 => constraint(text),
        2 => placement(text),
        3 => pairs(text),
        4 => reference(Kind::Secret, text),
        5 => reference(Kind::Config, text),
        6 => duration(text),
        7 => node_id(text),
        _ => spec(text),
    }
});
