//! The request body reader, differential against a strict parser: whatever `serde_json` reads
//! as an object (a subset of what lenient upstreams accept), the reader reads the same facts from
//! it, taking the last of a repeated key as serde does. And the plugin's edits keep any body it
//! could read readable, with usage asked for and no cap above the one written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::body::{rewrite, Api, BodyFacts, Edits};
use serde_json::Value;

/// The keys the reader looks at, folded as it folds them (ASCII case and `_` ignored), with
/// the spellings serde (as Python) also reads as them.
const FIELDS: &[(&str, &[&str])] = &[
    ("model", &["model"]),
    ("maxtokens", &["max_tokens"]),
    ("maxcompletiontokens", &["max_completion_tokens"]),
    ("maxoutputtokens", &["max_output_tokens", "maxOutputTokens"]),
    ("n", &["n"]),
    ("bestof", &["best_of"]),
    ("stream", &["stream"]),
    ("streamoptions", &["stream_options"]),
    ("generationconfig", &["generationConfig", "generation_config"]),
    ("includeusage", &["include_usage"]),
    ("candidatecount", &["candidateCount", "candidate_count"]),
];

fn fold(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether an object's keys name a field the way only a case-insensitive parser (Go) reads
/// it, or name one field twice in two spellings: the reader then differs from serde on purpose
/// (it reads the first as Go does, and refuses the second as unreadable).
fn spelled_apart(map: &serde_json::Map<String, Value>) -> bool {
    let mut seen: Vec<(String, &str)> = Vec::new();
    for key in map.keys() {
        let folded = fold(key);
        let Some((_, exact)) = FIELDS.iter().find(|(f, _)| *f == folded) else {
            continue;
        };
        if !exact.contains(&key.as_str()) || seen.iter().any(|(f, k)| *f == folded && k != key) {
            return true;
        }
        seen.push((folded, key));
    }
    ["stream_options", "generationConfig", "generation_config"]
        .iter()
        .filter_map(|k| map.get(*k)?.as_object())
        .any(spelled_apart)
}

fuzz_target!(|data: &[u8]| {
    let facts = BodyFacts::parse(data);
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) {
        if spelled_apart(&map) {
            return;
        }
        let f = facts
            .as_ref()
            .unwrap_or_else(|| panic!("serde reads it, the plugin must too"));
        assert_eq!(f.model.as_deref(), map.get("model").and_then(Value::as_str));
        if let Some(b) = map.get("stream").and_then(Value::as_bool) {
            assert_eq!(f.stream, Some(b));
        }
        for (field, read) in [
            ("max_tokens", f.max_tokens),
            ("max_completion_tokens", f.max_completion_tokens),
            ("max_output_tokens", f.max_output_tokens),
        ] {
            // A cap of zero is no cap.
            if let Some(n) = map.get(field).and_then(Value::as_u64).filter(|n| *n > 0) {
                assert_eq!(read, Some(n), "{field}");
            }
        }
        if let Some(n) = map.get("n").and_then(Value::as_u64) {
            assert_eq!(f.n, Some(n));
        }
    }
    let Some(f) = facts else {
        return;
    };
    for api in [Api::Chat, Api::Messages, Api::Responses, Api::Gemini] {
        let edits = Edits {
            stream_usage: true,
            cap: Some((77, api)),
        };
        let Some(out) = rewrite(data, &f, edits) else {
            assert!(!f.needs_stream_usage());
            continue;
        };
        let again =
            BodyFacts::parse(&out).unwrap_or_else(|| panic!("an edited body stays readable"));
        assert!(!again.needs_stream_usage());
        assert!(again.output_token_cap(api).map_or(true, |c| c <= 77));
        assert_eq!(again.model, f.model);
    }
});
