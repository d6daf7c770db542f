//! Every dependency in Cargo.toml is used by the code (the check `cargo machete` makes, here so
//! CI needs no extra tool): a crate listed but never named in `src/`, `tests/` or `examples/`
//! is reported by name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

/// Source text of every `.rs` file under `dirs` of `root`.
fn sources(root: &Path, dirs: &[&str]) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
                out.push('\n');
            }
        }
    }
    let mut out = String::new();
    for d in dirs {
        walk(&root.join(d), &mut out);
    }
    out
}

/// Dependencies (normal and dev) of `manifest` whose crate name never appears in `code` as a
/// path (`name::`) or an import (`use name`).
fn unused(manifest: &str, code: &str) -> Vec<String> {
    let doc: toml::Table = toml::from_str(manifest).unwrap();
    let mut out = Vec::new();
    for section in ["dependencies", "dev-dependencies"] {
        let Some(deps) = doc.get(section).and_then(|d| d.as_table()) else {
            continue;
        };
        for name in deps.keys() {
            let ident = name.replace('-', "_");
            let used = code.match_indices(&ident).any(|(i, _)| {
                let before = code[..i].chars().next_back();
                let after = &code[i + ident.len()..];
                let boundary = !before.is_some_and(|c| c.is_alphanumeric() || c == '_');
                let named = after.trim_start().starts_with("::")
                    || code[..i].trim_end().ends_with("use")
                    || code[..i].trim_end().ends_with("extern crate");
                boundary && named
            });
            if !used {
                out.push(format!("{section}.{name}"));
            }
        }
    }
    out
}

#[test]
fn every_dependency_is_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let code = sources(root, &["src", "tests", "examples", "benches"]);
    let found = unused(&manifest, &code);
    assert!(
        found.is_empty(),
        "listed in Cargo.toml but never used: {found:?}"
    );
}

#[test]
fn a_planted_unused_dependency_is_named() {
    let manifest =
        "[dependencies]\nserde = \"1\"\nsome-crate = \"1\"\n[dev-dependencies]\ntempfile = \"3\"\n";
    let code = "use serde::Deserialize;\nfn f() { let _ = tempfile::tempdir(); }\n// some_crate is only mentioned\n";
    assert_eq!(unused(manifest, code), ["dependencies.some-crate"]);
}
