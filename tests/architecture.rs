//! No module of the plugin or of the service imports a module that imports it back, directly or
//! through others: the layers stay readable from the bottom up. A module depends on what its
//! `use` declarations and paths name (`crate::a::b`, `super::x`, `child::Item`); a glob of the
//! parent (`use super::*`) is a dependency on the parent's own items, and a parent's
//! `pub use child::…` on that child. Test modules are left out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use testkit::repo;

/// Module path (`config::model`, `` for the crate root) → file text without its tests.
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
                continue;
            }
            if path.extension().map_or(true, |e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            out.insert(parts.join("::"), text);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// Identifiers joined by `::` starting at `at` in `text`.
fn path_at(text: &str, at: usize) -> Vec<&str> {
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].split("::").filter(|s| !s.is_empty()).collect()
}

fn dependencies(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (name, text) in modules {
        let parent = name.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        let join = |base: &str, segs: &[&str]| -> Option<String> {
            // The longest prefix of `segs` under `base` that is a module.
            (1..=segs.len()).rev().find_map(|n| {
                let tail = segs[..n].join("::");
                let full = if base.is_empty() {
                    tail
                } else {
                    format!("{base}::{tail}")
                };
                modules.contains_key(&full).then_some(full)
            })
        };
        let mut deps = BTreeSet::new();
        // Only code: comments (and doc links in them) are not dependencies.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for (at, _) in code.match_indices("crate::") {
            if let Some(m) = join("", &path_at(&code, at + 7)) {
                deps.insert(m);
            }
        }
        for (at, _) in code.match_indices("super::") {
            let segs = path_at(&code, at + 7);
            match join(&parent, &segs) {
                Some(m) => deps.insert(m),
                None => deps.insert(parent.clone()),
            };
        }
        // A parent naming its children's items (`child::Item`, `pub use child::…`).
        for child in modules.keys() {
            let Some(short) = child
                .strip_prefix(name.as_str())
                .and_then(|r| {
                    r.strip_prefix("::")
                        .or(if name.is_empty() { Some(r) } else { None })
                })
                .filter(|r| !r.contains("::") && !r.is_empty())
            else {
                continue;
            };
            let named = code.match_indices(&format!("{short}::")).any(|(i, _)| {
                !code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            });
            if named {
                deps.insert(child.clone());
            }
        }
        deps.remove(name);
        edges.insert(name.clone(), deps);
    }
    edges
}

/// The circles (strongly connected components of more than one module).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in edges.keys() {
        // Every module reachable from `start` that reaches `start` back.
        let reach = |from: &str| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![from.to_string()];
            while let Some(m) = stack.pop() {
                for d in edges.get(&m).into_iter().flatten() {
                    if seen.insert(d.clone()) {
                        stack.push(d.clone());
                    }
                }
            }
            seen
        };
        let forward = reach(start);
        if !forward.contains(start) {
            continue;
        }
        let circle: Vec<String> = forward
            .into_iter()
            .filter(|m| reach(m).contains(start))
            .collect();
        if !out.contains(&circle) {
            out.push(circle);
        }
    }
    out
}

fn assert_acyclic(src: &str) {
    let modules = modules(&repo().join(src));
    assert!(modules.len() > 10, "{src}: {} modules", modules.len());
    let edges = dependencies(&modules);
    assert!(
        edges.values().map(BTreeSet::len).sum::<usize>() > 30,
        "{src}: the dependencies were read"
    );
    let found = circles(&edges);
    assert!(found.is_empty(), "{src}: import circles: {found:?}");
}

#[test]
fn the_plugin_has_no_import_circle() {
    assert_acyclic("src");
}

#[test]
fn the_service_has_no_import_circle() {
    assert_acyclic("examples/ratelimit-service/src");
}

/// The checker finds a circle where there is one.
#[test]
fn a_circle_is_found() {
    let modules: BTreeMap<String, String> = [
        ("a".to_string(), "use crate::b::X;".to_string()),
        ("b".to_string(), "use crate::c::Y;".to_string()),
        ("c".to_string(), "fn f() { crate::a::g() }".to_string()),
        ("d".to_string(), "use crate::a;".to_string()),
    ]
    .into();
    let found = circles(&dependencies(&modules));
    assert_eq!(found, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
}
