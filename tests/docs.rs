//! The documentation holds together: every link between the README and the book's pages
//! (`docs/src`) lands on a page and a heading that exist, the book's summary lists every page,
//! and every field of the plugin's JSON Schema is named in the book.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use testkit::repo;

/// A heading's anchor as mdBook and GitHub make it: lower case, spaces as `-`, punctuation
/// dropped; a repeated heading gets `-1`, `-2`…
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut fence = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        let Some(heading) = line.strip_prefix('#').filter(|_| !fence) else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c.to_ascii_lowercase()),
                c if c.is_whitespace() => Some('-'),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// `[label](target)` links outside code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fence = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        if fence {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages
}

#[test]
fn every_link_lands_on_a_page_and_a_heading() {
    let mut files = pages();
    files.push(repo().join("README.md"));
    let (mut broken, mut checked) = (Vec::new(), 0);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target: &Path = if path.is_empty() {
                file
            } else {
                &file.parent().unwrap().join(path)
            };
            let ok = target.exists()
                && (anchor.is_empty()
                    || anchors(&std::fs::read_to_string(target).unwrap()).contains(anchor));
            if !ok {
                broken.push(format!("{}: {link}", file.display()));
            }
            checked += 1;
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 50, "{checked} links");
}

#[test]
fn the_summary_lists_every_page() {
    let summary = std::fs::read_to_string(repo().join("docs/src/SUMMARY.md")).unwrap();
    let listed: BTreeSet<String> = links(&summary).into_iter().collect();
    for page in pages() {
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        if name != "SUMMARY.md" {
            assert!(listed.contains(&name), "SUMMARY.md does not list {name}");
        }
    }
    for name in &listed {
        assert!(repo().join("docs/src").join(name).exists(), "{name}");
    }
}

/// Every property of the generated JSON Schema (all three shapes) is named in the book, in
/// code (`` `deny_status` ``, `` `limits[].deny_status` ``), so no field ships undocumented.
#[test]
fn every_schema_field_is_documented() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/schema/plugin-config.schema.json")).unwrap(),
    )
    .unwrap();
    fn fields(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    if k == "properties" {
                        if let Value::Object(props) = x {
                            out.extend(props.keys().cloned());
                        }
                    }
                    fields(x, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|x| fields(x, out)),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    fields(&schema, &mut names);
    assert!(names.len() > 50, "{names:?}");
    let code: Vec<String> = pages()
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let named = |name: &str| {
        code.iter().any(|span| {
            span.match_indices(name).any(|(i, _)| {
                let before = span[..i].chars().next_back();
                let after = span[i + name.len()..].chars().next();
                !before.is_some_and(word) && !after.is_some_and(word)
            })
        })
    };
    let missing: Vec<&String> = names.iter().filter(|n| !named(n)).collect();
    assert!(
        missing.is_empty(),
        "fields the book never names: {missing:?}"
    );
}
