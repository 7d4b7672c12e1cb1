//! The agent's layering, checked in the lint lane: which of its top-level
//! modules may use which, read from the `crate::` paths in each module's
//! code (comments and unit tests left out). The layers, from the bottom:
//!
//! - `api` (plain data and pure helpers) uses nothing else of the crate;
//! - `dataplane` (kernel access) and `metrics` (instruments, rendering, the
//!   HTTP endpoints) use no other layer;
//! - `ca` (keys and certificates) uses `api`; `wire` (the transports) uses
//!   `api` and `ca`;
//! - `manager` (the leader's side) and `agent` (what runs on a node) never
//!   use each other; `node` (a node's life in the swarm) is the one layer
//!   over both; `cli` and the binaries sit on top.
//!
//! Every top-level module has its row in [`ALLOWED`]; a new one must be
//! given its place there. Besides these rules, no two modules (two levels
//! deep: `manager::dispatcher`, `agent::net`) may use each other through any
//! path. A refusal names the files and the path that break the rule.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Utility modules any layer may use.
const UTILITIES: &[&str] = &["locks"];

/// (layer, the layers it may use besides itself and the utilities).
const ALLOWED: &[(&str, &[&str])] = &[
    ("api", &[]),
    ("dataplane", &[]),
    ("metrics", &[]),
    ("preflight", &["dataplane", "agent"]),
    ("ca", &["api"]),
    ("wire", &["api", "ca"]),
    ("manager", &["api", "ca", "wire", "metrics"]),
    ("agent", &["api", "dataplane", "metrics"]),
    ("config_file", &["api", "agent", "metrics", "wire"]),
    (
        "node",
        &[
            "api",
            "ca",
            "wire",
            "manager",
            "agent",
            "dataplane",
            "metrics",
            "preflight",
            "config_file",
        ],
    ),
    ("locks", &[]),
];

/// The crates whose layering is checked: (sources, the layers that crate
/// takes from another one and re-exports under its own root).
pub const CRATES: &[(&str, &[&str])] = &[("mesh-api/src", &[]), ("mesh-agent/src", &["api", "ca", "wire"])];

/// Checks every crate of [`CRATES`] under `root`.
pub fn check_all(root: &Path) -> Result<()> {
    for (src, external) in CRATES {
        check(&root.join(src), external)?;
    }
    Ok(())
}

/// Checks the crate whose sources are in `src`; `external` are the layers
/// it re-exports from another crate (`pub use mesh_api::{api, ...}`).
pub fn check(src: &Path, external: &[&str]) -> Result<()> {
    let uses = crate_uses(src, external)?;
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut problems = Vec::new();
    let mut found: BTreeMap<(String, String), BTreeSet<PathBuf>> = BTreeMap::new();
    for (from, tos) in &uses {
        for (to, files) in tos {
            let (from, to) = (top(from), top(to));
            if from != to && !UTILITIES.contains(&to.as_str()) {
                found.entry((from, to)).or_default().extend(files.iter().cloned());
            }
        }
    }
    let layers: BTreeSet<String> = uses
        .keys()
        .map(|m| top(m))
        .filter(|m| !external.contains(&m.as_str()))
        .collect();
    for layer in &layers {
        if !ALLOWED.iter().any(|(name, _)| name == layer) {
            problems.push(format!(
                "{layer} has no place in the layers: give it a row in ALLOWED (xtask/src/layers.rs)"
            ));
        }
    }
    for ((from, to), files) in found {
        let allowed = ALLOWED.iter().find(|(name, _)| *name == from).map(|(_, may)| *may);
        if allowed.is_some_and(|may| !may.contains(&to.as_str())) {
            problems.push(format!("{from} uses {to} (in {})", list(&files)));
        }
    }
    let graph: BTreeMap<String, BTreeSet<String>> = uses
        .iter()
        .map(|(from, to)| (from.clone(), to.keys().cloned().collect()))
        .collect();
    for component in tangles(&graph) {
        let inside: BTreeSet<&String> = component.iter().collect();
        let steps: Vec<String> = component
            .iter()
            .flat_map(|from| {
                uses[from]
                    .iter()
                    .filter(|(to, _)| inside.contains(to))
                    .map(move |(to, files)| format!("{from} -> {to} (in {})", list(files)))
            })
            .collect();
        problems.push(format!(
            "modules that use each other ({}):\n    {}",
            component.join(", "),
            steps.join("\n    ")
        ));
    }
    if problems.is_empty() {
        println!(
            "layers: {}: {} modules, no cycle, no layer used from below",
            src.display(),
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

/// For each module (two levels deep at most): the modules it uses, with
/// the files that do.
type Uses = BTreeMap<String, BTreeMap<String, BTreeSet<PathBuf>>>;

fn crate_uses(src: &Path, external: &[&str]) -> Result<Uses> {
    let files = rust_files(src)?;
    let modules: BTreeSet<Module> = files
        .iter()
        .map(|f| file_module(f.strip_prefix(src).unwrap_or(f)))
        .collect();
    let node_of = |path: &[String]| -> Option<String> {
        if let Some(first) = path.first().filter(|f| external.contains(&f.as_str())) {
            return Some(first.clone());
        }
        (1..=path.len().min(2))
            .rev()
            .map(|depth| path[..depth].to_vec())
            .find(|m| modules.contains(m))
            .map(|m| m.join("::"))
    };
    let mut uses = Uses::new();
    for file in &files {
        let relative = file.strip_prefix(src).unwrap_or(file).to_path_buf();
        if relative.starts_with("bin") {
            continue;
        }
        let module = file_module(&relative);
        let Some(from) = node_of(&module) else {
            continue;
        };
        let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let entry = uses.entry(from.clone()).or_default();
        for path in module_paths(&production_code(&text), &module) {
            if let Some(to) = node_of(&path) {
                // A module's parent declares it; a use of the parent's own
                // items from inside counts, the declaration does not.
                if to != from && !(from.starts_with(&format!("{to}::")) && path.len() <= 1) {
                    entry.entry(to).or_default().insert(relative.clone());
                }
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

/// The groups of modules that reach each other (strongly connected
/// components of more than one module), each sorted.
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, node: &'g str) {
            let at = self.index.len();
            self.index.insert(node, at);
            self.low.insert(node, at);
            self.stack.push(node);
            for next in self.graph.get(node).into_iter().flatten() {
                if !self.index.contains_key(next.as_str()) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next.as_str()]);
                    self.low.insert(node, low);
                } else if self.stack.contains(&next.as_str()) {
                    let low = self.low[node].min(self.index[next.as_str()]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let from = self.stack.iter().rposition(|n| *n == node).unwrap_or(0);
                let mut component: Vec<String> = self.stack.drain(from..).map(String::from).collect();
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found.sort();
    walk.found
}

/// A module of the crate, as its path (`["manager", "state"]`); modules
/// deeper than two levels count as their two-level ancestor.
type Module = Vec<String>;

/// The module a file defines (`manager/state/mod.rs` -> manager::state,
/// `api/messages.rs` -> api::messages, `lib.rs` -> the crate root).
fn file_module(relative: &Path) -> Module {
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        if !matches!(last.as_str(), "mod.rs" | "lib.rs" | "main.rs") {
            parts.push(last.trim_end_matches(".rs").to_string());
        }
    }
    parts
}

/// `text` without comments and without the unit tests at its end (a
/// `#[cfg(test)]` module): test code may reach anywhere.
fn production_code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| {
            w[0].trim() == "#[cfg(test)]" && {
                let next = w[1].trim_start_matches("pub(crate) ").trim_start_matches("pub ");
                next.starts_with("mod ") && !w[1].starts_with(' ')
            }
        })
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path `text` names from `crate::`, `super::` or `self::`, with
/// `use` groups expanded, resolved against `module` (the file's own).
fn module_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_' || bytes[i - 1] == '$');
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let base: Option<Vec<String>> = if !starts_word {
            None
        } else if rest.starts_with("crate::") {
            Some(Vec::new())
        } else if rest.starts_with("super::") || rest.starts_with("self::") {
            Some(module.to_vec())
        } else {
            None
        };
        match base {
            Some(base) => {
                let (paths, used) = parse_tree(&bytes[i..], base);
                out.extend(paths);
                i += used.max(1);
            }
            None => i += 1,
        }
    }
    out
}

/// Parses a path tree (`a::b::{c, d::e}`) at the start of `s`, applying
/// `super`/`self` to `base`; returns the full paths and the characters used.
fn parse_tree(s: &[char], base: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut path = base;
    let mut i = 0;
    let ident = |at: usize| -> String {
        s[at..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || **c == '_')
            .collect()
    };
    let skip_ws = |mut at: usize| {
        while at < s.len() && s[at].is_whitespace() {
            at += 1;
        }
        at
    };
    loop {
        i = skip_ws(i);
        if i < s.len() && s[i] == '{' {
            let mut paths = Vec::new();
            i += 1;
            loop {
                i = skip_ws(i);
                if i >= s.len() {
                    return (paths, i);
                }
                if s[i] == '}' {
                    return (paths, i + 1);
                }
                if s[i] == ',' {
                    i += 1;
                    continue;
                }
                let (inner, used) = parse_tree(&s[i..], path.clone());
                paths.extend(inner);
                i += used.max(1);
            }
        }
        let name = ident(i);
        if name.is_empty() {
            return (vec![path], i);
        }
        i += name.len();
        match name.as_str() {
            "crate" => path.clear(),
            "super" => {
                path.pop();
            }
            "self" => {}
            _ => path.push(name),
        }
        if s.get(i) == Some(&':') && s.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            return (vec![path], i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(paths: Vec<Vec<String>>) -> Vec<String> {
        paths.into_iter().map(|p| p.join("::")).collect()
    }

    #[test]
    fn paths_groups_super_and_comments() {
        let text = "use crate::locks::Locked;\n\
                    use crate::{\n    manager::{api::X, state},\n    agent::mesh, self,\n};\n\
                    use super::{seal, super::node::Y};\n\
                    // crate::node in a comment\n\
                    /// [`crate::cli::x`] in a doc\n\
                    let x = crate::metrics::instruments(); $crate::ignored; mesh_crate::no;\n\
                    #[cfg(test)]\nmod tests {\n    use crate::cli::Z;\n}\n";
        let module = vec!["ca".to_string(), "keystore".to_string()];
        let found = strings(module_paths(&production_code(text), &module));
        assert_eq!(
            found,
            [
                "locks::Locked",
                "manager::api::X",
                "manager::state",
                "agent::mesh",
                "",
                "ca::seal",
                "node::Y",
                "metrics::instruments",
            ]
        );
    }

    #[test]
    fn files_define_modules() {
        let m = |p: &str| file_module(Path::new(p)).join("::");
        assert_eq!(m("wire/rpc.rs"), "wire::rpc");
        assert_eq!(m("manager/state/mod.rs"), "manager::state");
        assert_eq!(m("manager/state/tasks.rs"), "manager::state::tasks");
        assert_eq!(m("locks.rs"), "locks");
        assert_eq!(m("lib.rs"), "");
    }

    #[test]
    fn tangles_are_found_and_named() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().insert(b.to_string());
            }
            g
        };
        assert!(tangles(&graph(&[("node", "manager"), ("node", "agent"), ("agent", "api")])).is_empty());
        let found = tangles(&graph(&[
            ("manager", "agent"),
            ("agent", "dataplane"),
            ("agent", "manager"),
            ("a", "b"),
            ("b", "c"),
            ("c", "a"),
        ]));
        assert_eq!(found, [vec!["a", "b", "c"], vec!["agent", "manager"]]);
    }

    #[test]
    fn a_layer_used_from_below_and_an_unplaced_module_are_refused() {
        let src = std::env::temp_dir().join(format!("mesh-layers-{}", std::process::id()));
        let write = |path: &str, text: &str| {
            let file = src.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, text).unwrap();
        };
        write("lib.rs", "pub mod api;\npub mod manager;\n");
        write("api/mod.rs", "pub mod objects;\n");
        write("api/objects.rs", "pub struct Node;\n");
        write(
            "manager/mod.rs",
            "use crate::api::objects::Node;\nuse crate::locks::Locked;\n",
        );
        write("locks.rs", "pub struct Locked;\n");
        assert!(check(&src, &[]).is_ok());
        write("api/objects.rs", "pub struct Node(crate::manager::Thing);\n");
        let refusal = check(&src, &[]).unwrap_err().to_string();
        assert!(refusal.contains("api uses manager (in api/objects.rs)"), "{refusal}");
        assert!(
            refusal.contains("modules that use each other (api::objects, manager)"),
            "{refusal}"
        );
        write("api/objects.rs", "pub struct Node;\n");
        // A layer re-exported from another crate is checked like one of its own.
        write("dataplane/mod.rs", "use crate::wire::Client;\n");
        let refusal = check(&src, &["wire"]).unwrap_err().to_string();
        assert!(
            refusal.contains("dataplane uses wire (in dataplane/mod.rs)"),
            "{refusal}"
        );
        write("dataplane/mod.rs", "pub struct Link;\n");
        write("extra.rs", "pub struct X;\n");
        let refusal = check(&src, &[]).unwrap_err().to_string();
        assert!(refusal.contains("extra has no place in the layers"), "{refusal}");
        fs::remove_dir_all(&src).unwrap();
    }
}
