//! Real recorded provider responses (`tests/fixtures/replay/`: each `<id>.body` copied byte for
//! byte from a public project's cassette or fixture, `<id>.json` naming its source and the usage
//! the provider billed), replayed through the plugin in a real Envoy to the real service: whole,
//! and split at awkward byte boundaries (inside the usage keys and the billed numbers, inside
//! multi-byte characters, between `\r` and `\n`). Each answer must be charged what the provider
//! billed: its total under `usage.count: "total"`, its output (with Gemini's thoughts) under
//! `"completion"`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Behaviour, Server};
use testkit::service::Service;

const BUDGET: u64 = 1_000_000_000;

struct Case {
    id: String,
    meta: Value,
    body: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir = testkit::repo().join("tests/fixtures/replay");
    let mut cases: Vec<Case> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "json").then_some(path)
        })
        .map(|path| {
            let meta: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let id = meta["id"].as_str().unwrap().to_string();
            let body = std::fs::read(dir.join(format!("{id}.body"))).unwrap();
            assert!(
                meta["source"]["url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("https://github.com/")),
                "{id} names its source"
            );
            Case { id, meta, body }
        })
        .collect();
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    cases
}

/// What the provider billed, as the plugin should count it: (total, completion). Gemini and
/// Vertex bill thoughts beside `candidatesTokenCount`; the others count reasoning inside the
/// output already. `None` when the answer reports no usage.
fn billed(meta: &Value) -> Option<(u64, u64)> {
    let b = &meta["billed"];
    let total = b["total"].as_u64()?;
    let output = b["output"].as_u64()?;
    let thoughts = match meta["provider"].as_str() {
        Some("gemini" | "vertex") => b["reasoning"].as_u64().unwrap_or(0),
        _ => 0,
    };
    Some((total, output + thoughts))
}

/// Where to cut the body: inside every usage key and every billed figure, inside multi-byte
/// UTF-8 characters, between `\r` and `\n`, and the last bytes one by one.
fn awkward_cuts(case: &Case) -> Vec<usize> {
    let body = &case.body;
    let mut cuts = BTreeSet::new();
    let mut inside = |needle: &[u8]| {
        for (at, _) in body
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
        {
            cuts.insert(at + needle.len() / 2);
        }
    };
    for key in [
        &b"\"usage\""[..],
        b"usageMetadata",
        b"iterations",
        b"_tokens\"",
        b"TokenCount\"",
        b"data:",
    ] {
        inside(key);
    }
    for figure in meta_figures(&case.meta) {
        inside(format!(":{figure}").as_bytes());
        inside(format!(": {figure}").as_bytes());
    }
    for (at, pair) in body.windows(2).enumerate() {
        // A lead byte followed by a continuation byte: cut between them.
        if pair[0] >= 0xC0 && (pair[1] & 0xC0) == 0x80 {
            cuts.insert(at + 1);
        }
        if pair == b"\r\n" {
            cuts.insert(at + 1);
        }
    }
    for at in body.len().saturating_sub(24)..body.len() {
        cuts.insert(at);
    }
    // Bounded, so the largest bodies stay quick: every cut near the end, a spread elsewhere.
    let cuts: Vec<usize> = cuts
        .into_iter()
        .filter(|c| *c > 0 && *c < body.len())
        .collect();
    let step = cuts.len().div_ceil(150).max(1);
    let tail = body.len().saturating_sub(4096);
    cuts.iter()
        .enumerate()
        .filter(|(i, c)| **c >= tail || i % step == 0)
        .map(|(_, c)| *c)
        .collect()
}

fn meta_figures(meta: &Value) -> Vec<u64> {
    meta["billed"]
        .as_object()
        .map(|b| {
            b.values()
                .filter_map(Value::as_u64)
                .filter(|n| *n > 9)
                .collect()
        })
        .unwrap_or_default()
}

fn pieces(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut from = 0;
    for &c in cuts {
        out.push(body[from..c].to_vec());
        from = c;
    }
    out.push(body[from..].to_vec());
    out
}

fn config(count: &str) -> Value {
    json!({
        "service": {"cluster": "ratelimit"},
        "usage": {"count": count},
        "limits": [{"name": "replay", "key": "{{request.headers.x-replay-key}}",
                    "tokens": BUDGET, "window": "1h"}]
    })
}

#[test]
fn every_recorded_answer_is_charged_what_the_provider_billed() {
    let cases = corpus();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let providers: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c.meta["provider"].as_str())
        .collect();
    for p in [
        "openai",
        "openai-responses",
        "anthropic",
        "gemini",
        "vertex",
        "vllm",
        "dashscope",
        "deepseek",
        "openrouter",
        "mistral",
        "groq",
    ] {
        assert!(providers.contains(p), "the corpus has {p}");
        for streaming in [false, true] {
            assert!(
                cases
                    .iter()
                    .any(|c| c.meta["provider"] == p && c.meta["streaming"] == streaming),
                "{p}: a {} case",
                if streaming { "streamed" } else { "JSON" }
            );
        }
    }

    let svc = Service::start(&[], &[]);
    // The upstream answers the case the request names, whole or in the named pieces.
    let shared: std::sync::Arc<Vec<(String, Value, Vec<u8>)>> = std::sync::Arc::new(
        cases
            .iter()
            .map(|c| (c.id.clone(), c.meta.clone(), c.body.clone()))
            .collect(),
    );
    let upstream = Server::start(move |req| {
        let id = req.header("x-replay-case").unwrap();
        let (_, meta, body) = shared.iter().find(|(i, _, _)| i == id).unwrap();
        let cuts: Vec<usize> = req
            .header("x-replay-cuts")
            .filter(|c| !c.is_empty())
            .map(|c| c.split(',').map(|n| n.parse().unwrap()).collect())
            .unwrap_or_default();
        let content_type = meta["content_type"].as_str().map_or_else(
            || {
                if meta["streaming"] == true {
                    "text/event-stream".to_string()
                } else {
                    "application/json".to_string()
                }
            },
            str::to_string,
        );
        Behaviour::Trickle {
            status: 200,
            headers: vec![("content-type".into(), content_type)],
            pieces: pieces(body, &cuts),
            gap: Duration::from_millis(if cuts.is_empty() { 0 } else { 2 }),
        }
    });
    let clusters = [
        cluster("ratelimit", svc.port),
        cluster("upstream", upstream.port),
    ];
    let by_total = Envoy::start(&config("total"), &clusters);
    let by_completion = Envoy::start(&config("completion"), &clusters);

    let mut failures = Vec::new();
    for case in &cases {
        let path = case.meta["request_path"].as_str().unwrap();
        let model = case.meta["model"].as_str().unwrap_or("m");
        let request = json!({"model": model, "stream": case.meta["streaming"] == true,
                             "messages": [{"role": "user", "content": "replay"}]});
        let cuts = awkward_cuts(case);
        let cut_list = cuts
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        for (split, cuts) in [("whole", ""), ("split", cut_list.as_str())] {
            for (envoy, count) in [(&by_total, "total"), (&by_completion, "completion")] {
                let key = format!("{}-{split}-{count}", case.id);
                let r = http::post_json(
                    envoy.port,
                    path,
                    &[
                        ("x-replay-case", case.id.as_str()),
                        ("x-replay-cuts", cuts),
                        ("x-replay-key", key.as_str()),
                    ],
                    &request,
                );
                assert_eq!(r.status, 200, "{key}: {}", r.text());
                match billed(&case.meta) {
                    Some((total, completion)) => {
                        let want = if count == "total" { total } else { completion };
                        let charged = settle(&svc, &key, want);
                        if charged != Some(want) {
                            failures.push(format!(
                                "{key}: charged {charged:?}, the provider billed {want} ({})",
                                case.meta["billed_from"].as_str().unwrap_or("")
                            ));
                        }
                    }
                    // No usage in the answer: it is charged the estimate, never nothing.
                    None => {
                        let charged = settle(&svc, &key, u64::MAX);
                        if !charged.is_some_and(|c| c > 0) {
                            failures.push(format!("{key}: no usage, charged {charged:?}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        by_total.metric("usage.estimated"),
        2,
        "only the case without usage, whole and split"
    );
}

/// The tokens charged to `key` once its report arrived: waits for `want` (or, for
/// `u64::MAX`, any charge) for up to 10 s, then returns what the counter has.
fn settle(svc: &Service, key: &str, want: u64) -> Option<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let charged = svc.remaining("replay", key).map(|r| BUDGET - r);
        let done = match want {
            u64::MAX => charged.is_some_and(|c| c > 0),
            w => charged == Some(w),
        };
        if done || std::time::Instant::now() > deadline {
            return charged;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
