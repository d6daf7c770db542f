//! The layering rule of ARCHITECTURE.md, checked on the source itself: `core` imports neither
//! `daemon` nor `offline`, `daemon` and `offline` never import each other, and no two sibling
//! modules import each other, directly or around a loop (a module and its own submodules count
//! as one, so a folder's `mod.rs` may use its children).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module path inside the crate, e.g. `["daemon", "source", "camera"]`.
type ModPath = Vec<String>;

/// Every `.rs` file of the library with its module path.
fn modules(src: &Path) -> Vec<(ModPath, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("source folder") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "bin") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut m: ModPath = rel
                .iter()
                .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if matches!(m.last().map(String::as_str), Some("mod" | "lib")) {
                m.pop();
            }
            out.push((m, p));
        }
    }
    out.sort();
    out
}

/// Collects every path a file names that starts at `crate`, `super` or `self`, made absolute.
struct Refs {
    here: ModPath,
    found: Vec<ModPath>,
}

impl Refs {
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let first = segments.first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.here.clone(),
            "super" => self.here.clone(),
            _ => return None,
        };
        let mut rest = &segments[1..];
        if first == "super" {
            base.pop();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.push_with(prefix, &n.ident.to_string()),
            syn::UseTree::Rename(r) => self.push_with(prefix, &r.ident.to_string()),
            syn::UseTree::Glob(_) => {
                if let Some(p) = self.absolute(prefix) {
                    self.found.push(p);
                }
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn push_with(&mut self, prefix: &[String], last: &str) {
        let mut all = prefix.to_vec();
        if last != "self" {
            all.push(last.to_string());
        }
        if let Some(p) = self.absolute(&all) {
            self.found.push(p);
        }
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_none() {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            if let Some(abs) = self.absolute(&segs) {
                self.found.push(abs);
            }
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }
}

/// Module → the modules it refers to (file granularity), self-references left out.
fn graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mods = modules(src);
    let known: BTreeSet<ModPath> = mods.iter().map(|(m, _)| m.clone()).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (m, path) in &mods {
        let text = std::fs::read_to_string(path).expect("source file");
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut refs = Refs {
            here: m.clone(),
            found: Vec::new(),
        };
        refs.visit_file(&file);
        for r in refs.found {
            // The longest prefix that is a module file is the module referred to.
            let target = (0..=r.len())
                .rev()
                .map(|n| r[..n].to_vec())
                .find(|p| known.contains(p))
                .unwrap_or_default();
            if &target != m {
                edges.entry(m.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

type Graph = BTreeMap<ModPath, BTreeSet<ModPath>>;

/// References that break the layer rule, as `from -> to`.
fn layer_breaks(g: &Graph) -> Vec<String> {
    let allowed = |from: &str, to: &str| {
        !matches!(
            (from, to),
            ("core", "daemon" | "offline") | ("daemon", "offline") | ("offline", "daemon")
        )
    };
    let mut broken = Vec::new();
    for (from, tos) in g {
        for to in tos {
            let (a, b) = (
                from.first().map_or("", String::as_str),
                to.first().map_or("", String::as_str),
            );
            if !allowed(a, b) {
                broken.push(format!("{} -> {}", name(from), name(to)));
            }
        }
    }
    broken
}

/// Loops between sibling modules, each written as the references that close it. A reference
/// between modules in different subtrees counts as one between the two children of their
/// nearest common ancestor; one module inside the other does not count.
fn cycles(g: &Graph) -> Vec<String> {
    let mut siblings: BTreeMap<ModPath, BTreeSet<(String, String)>> = BTreeMap::new();
    let mut witness: BTreeMap<(ModPath, String, String), String> = BTreeMap::new();
    for (from, tos) in g {
        for to in tos {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue;
            }
            let parent = from[..common].to_vec();
            let (a, b) = (from[common].clone(), to[common].clone());
            witness
                .entry((parent.clone(), a.clone(), b.clone()))
                .or_insert_with(|| format!("{} -> {}", name(from), name(to)));
            siblings.entry(parent).or_default().insert((a, b));
        }
    }
    let mut found = Vec::new();
    for (parent, edges) in &siblings {
        let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
        for start in nodes {
            // Depth-first search for a way back to `start`.
            let mut stack: Vec<Vec<&String>> = vec![vec![start]];
            let mut seen = BTreeSet::new();
            while let Some(path) = stack.pop() {
                let last = *path.last().expect("non-empty");
                for (_, b) in edges.iter().filter(|(a, _)| a == last) {
                    if b == start {
                        let mut loop_ = path.clone();
                        loop_.push(start);
                        // Start the loop at its smallest module, so each is listed once.
                        let steps: Vec<String> = loop_
                            .windows(2)
                            .map(|w| witness[&(parent.clone(), w[0].clone(), w[1].clone())].clone())
                            .collect();
                        let min = (0..steps.len()).min_by_key(|&i| &steps[i]).unwrap_or(0);
                        let mut rotated = steps[min..].to_vec();
                        rotated.extend_from_slice(&steps[..min]);
                        found.push(rotated.join(", "));
                    } else if seen.insert(b) {
                        let mut next = path.clone();
                        next.push(b);
                        stack.push(next);
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn core_daemon_and_offline_depend_one_way() {
    let g = graph(&src());
    let broken = layer_breaks(&g);
    assert!(
        broken.is_empty(),
        "layer rule broken:\n{}",
        broken.join("\n")
    );
    // The rule has something to hold: the layers exist and are used.
    assert!(g.keys().any(|m| m.first().is_some_and(|s| s == "daemon")));
    assert!(g.keys().any(|m| m.first().is_some_and(|s| s == "offline")));
    assert!(
        g.values()
            .flatten()
            .any(|m| m.first().is_some_and(|s| s == "core"))
    );
}

#[test]
fn no_two_sibling_modules_import_each_other() {
    let found = cycles(&graph(&src()));
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_sees_a_cycle_and_a_layer_break() {
    // A planted tree: core::a uses daemon::b; daemon::b and daemon::c use each other, and
    // daemon::c uses its own child daemon::c::d, which uses it back (allowed).
    let dir = tempfile::tempdir().expect("tempdir");
    let s = dir.path();
    for d in ["core", "daemon/c"] {
        std::fs::create_dir_all(s.join(d)).expect("dir");
    }
    let files = [
        ("lib.rs", "pub mod core; pub mod daemon;"),
        ("core/mod.rs", "pub mod a;"),
        ("core/a.rs", "use crate::daemon::b::B;"),
        ("daemon/mod.rs", "pub mod b; pub mod c;"),
        ("daemon/b.rs", "pub struct B; use super::c::{self, C};"),
        (
            "daemon/c/mod.rs",
            "pub mod d; pub struct C; fn f() { let _ = crate::daemon::b::B; let _ = d::D; }",
        ),
        ("daemon/c/d.rs", "pub struct D; use super::C;"),
    ];
    for (f, text) in files {
        std::fs::write(s.join(f), text).expect("write");
    }
    let g = graph(s);
    assert_eq!(layer_breaks(&g), vec!["core::a -> daemon::b".to_string()]);
    assert_eq!(
        cycles(&g),
        vec!["daemon::b -> daemon::c, daemon::c -> daemon::b".to_string()]
    );
}
