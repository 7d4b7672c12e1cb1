//! The agent's layering, checked in the lint lane: which of its top-level
//! modules may use which, read from the `crate::` paths in each module's
//! code (comments left out). The layers, from the bottom:
//!
//! - `dataplane` (kernel access) and `metrics` (instruments, rendering, the
//!   HTTP endpoints) use no other layer of the agent;
//! - `control` (the store, the leader, the messages) uses neither the node's
//!   `runtime` nor `node`;
//! - `runtime` (tasks, their networks, the routing mesh) does not use `node`;
//! - `node` (a node's life in the swarm) is the one layer over both
//!   `control` and `runtime`; `cli` and the binaries sit on top.
//!
//! Besides these rules, no two top-level modules may use each other, through
//! any path. A refusal names the files and the path that break the rule.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// (layer, the layers it must not use).
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("dataplane", &["control", "runtime", "node", "cli", "metrics"]),
    ("metrics", &["control", "runtime", "node", "cli"]),
    ("control", &["runtime", "node", "cli"]),
    ("runtime", &["node", "cli"]),
];

/// Checks the crate whose sources are in `src`.
pub fn check(src: &Path) -> Result<()> {
    let uses = crate_uses(src)?;
    let mut problems = Vec::new();
    for (layer, banned) in FORBIDDEN {
        for (to, files) in uses.get(*layer).into_iter().flatten() {
            if banned.contains(&to.as_str()) {
                problems.push(format!("{layer} uses {to} (in {})", list(files)));
            }
        }
    }
    let graph: BTreeMap<String, BTreeSet<String>> = uses
        .iter()
        .map(|(from, to)| (from.clone(), to.keys().cloned().collect()))
        .collect();
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} (in {})", w[0], w[1], list(&uses[&w[0]][&w[1]])))
            .collect();
        problems.push(format!("a cycle between top-level modules: {}", steps.join("; ")));
    }
    if problems.is_empty() {
        println!(
            "layers: {} top-level modules, no cycle, no layer used from below",
            graph.len()
        );
        return Ok(());
    }
    bail!(
        "the agent's layering is broken (see xtask/src/layers.rs for the rules):\n  {}",
        problems.join("\n  ")
    )
}

fn list(files: &BTreeSet<PathBuf>) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// For each top-level module: the top-level modules it uses, with the
/// files that do.
type Uses = BTreeMap<String, BTreeMap<String, BTreeSet<PathBuf>>>;

fn crate_uses(src: &Path) -> Result<Uses> {
    let mut uses = Uses::new();
    for file in rust_files(src)? {
        let relative = file.strip_prefix(src).unwrap_or(&file).to_path_buf();
        let Some(module) = top_module(&relative) else {
            continue;
        };
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let entry = uses.entry(module.clone()).or_default();
        for to in referenced_modules(&text) {
            if to != module {
                entry.entry(to).or_default().insert(relative.clone());
            }
        }
    }
    Ok(uses)
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The top-level module a file belongs to (`control/rpc.rs` -> control,
/// `locks.rs` -> locks); `None` for the crate root and the binaries.
fn top_module(relative: &Path) -> Option<String> {
    let mut parts = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let first = parts.next()?;
    match (first.as_str(), parts.next()) {
        ("lib.rs" | "main.rs", None) | ("bin", _) => None,
        (_, Some(_)) => Some(first),
        (file, None) => Some(file.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules `text` names through `crate::` paths, including
/// those inside `use crate::{a::..., b::...}` groups; comments do not count.
fn referenced_modules(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        // `mesh_crate::x` or `$crate::` are not this crate's paths.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(group_heads(group));
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The first segment of each path in a `{...}` group (`text` starts after
/// the brace).
fn group_heads(text: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_start = true;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_start = true,
            c if at_start && (c.is_alphanumeric() || c == '_') => current.push(c),
            _ if at_start && !current.is_empty() => {
                heads.push(std::mem::take(&mut current));
                at_start = false;
            }
            _ => {}
        }
    }
    if !current.is_empty() {
        heads.push(current);
    }
    heads.retain(|h| h != "self");
    heads
}

/// A cycle in `graph`, as the path that closes it (first node repeated at
/// the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_groups_and_comments() {
        let text = "use crate::locks::Locked;\n\
                    use crate::{\n    control::{api::X, state},\n    runtime::mesh, self,\n};\n\
                    // crate::node in a comment\n\
                    /// [`crate::cli::x`] in a doc\n\
                    let x = crate::metrics::instruments(); $crate::ignored; mesh_crate::no;\n";
        let found: Vec<String> = referenced_modules(text).into_iter().collect();
        assert_eq!(found, ["control", "locks", "metrics", "runtime"]);
    }

    #[test]
    fn files_belong_to_their_top_module() {
        assert_eq!(top_module(Path::new("control/rpc.rs")).as_deref(), Some("control"));
        assert_eq!(top_module(Path::new("locks.rs")).as_deref(), Some("locks"));
        assert_eq!(top_module(Path::new("node/mod.rs")).as_deref(), Some("node"));
        assert_eq!(top_module(Path::new("lib.rs")), None);
        assert_eq!(top_module(Path::new("bin/meshctl.rs")), None);
    }

    #[test]
    fn cycles_are_found_and_named() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().insert(b.to_string());
            }
            g
        };
        assert_eq!(
            find_cycle(&graph(&[
                ("node", "control"),
                ("node", "runtime"),
                ("runtime", "control")
            ])),
            None
        );
        let cycle = find_cycle(&graph(&[
            ("control", "runtime"),
            ("runtime", "dataplane"),
            ("runtime", "control"),
        ]))
        .expect("a cycle");
        assert_eq!(cycle, ["control", "runtime", "control"]);
    }
}
