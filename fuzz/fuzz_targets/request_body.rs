//! The request body reader, differential against a strict parser: whatever `serde_json` reads
//! as an object (a subset of what lenient upstreams accept), the reader reads the same facts from
//! it, taking the last of a repeated key as serde does. And the plugin's edits keep any body it
//! could read readable, with usage asked for and no cap above the one written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::body::{rewrite, Api, BodyFacts, Edits};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let facts = BodyFacts::parse(data);
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) {
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
            ("n", f.n),
        ] {
            if let Some(n) = map.get(field).and_then(Value::as_u64) {
                assert_eq!(read, Some(n), "{field}");
            }
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
        assert!(again.output_token_cap().map_or(true, |c| c <= 77));
        assert_eq!(again.model, f.model);
    }
});
