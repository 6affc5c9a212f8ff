//! The usage scanners on real-shaped provider responses, each fed whole, split in two at every
//! byte, and one byte at a time: the answer must never depend on where chunks break.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use llm_token_ratelimit::usage::{BodyFormat, Usage, UsageScanner};

struct Case {
    file: &'static str,
    format: BodyFormat,
    /// `None`: the response carries no usage.
    usage: Option<(u64, u64, u64)>,
}

const CASES: &[Case] = &[
    Case {
        file: "openai_chat.json",
        format: BodyFormat::Json,
        usage: Some((1117, 46, 1163)),
    },
    Case {
        file: "openai_chat_stream.sse",
        format: BodyFormat::Sse,
        usage: Some((9, 12, 21)),
    },
    Case {
        file: "openai_chat_stream_no_usage.sse",
        format: BodyFormat::Sse,
        usage: None,
    },
    Case {
        file: "openai_completions.json",
        format: BodyFormat::Json,
        usage: Some((5, 7, 12)),
    },
    Case {
        file: "openai_embeddings.json",
        format: BodyFormat::Json,
        usage: Some((8, 0, 8)),
    },
    Case {
        file: "openai_responses.json",
        format: BodyFormat::Json,
        usage: Some((328, 52, 380)),
    },
    Case {
        file: "openai_responses_stream.sse",
        format: BodyFormat::Sse,
        usage: Some((37, 11, 48)),
    },
    Case {
        file: "anthropic.json",
        format: BodyFormat::Json,
        // input + cache creation; the tool input's "usage" is data, not accounting.
        usage: Some((2095 + 2051, 503, 4649)),
    },
    Case {
        file: "anthropic_stream.sse",
        format: BodyFormat::Sse,
        // message_start's input + cache read; message_delta's cumulative output.
        usage: Some((35, 15, 50)),
    },
    Case {
        file: "gemini.json",
        format: BodyFormat::Json,
        // Thinking tokens are billed as output.
        usage: Some((8, 37, 45)),
    },
    Case {
        file: "gemini_stream.sse",
        format: BodyFormat::Sse,
        usage: Some((9, 24, 33)),
    },
    Case {
        file: "gemini_stream_array.json",
        format: BodyFormat::Json,
        usage: Some((9, 7, 16)),
    },
    Case {
        file: "dashscope.json",
        format: BodyFormat::Json,
        usage: Some((14, 17, 31)),
    },
    Case {
        file: "dashscope_stream.sse",
        format: BodyFormat::Sse,
        usage: Some((22, 18, 40)),
    },
    Case {
        file: "vllm_stream_continuous_usage.sse",
        format: BodyFormat::Sse,
        usage: Some((20, 2, 22)),
    },
    Case {
        file: "ollama_openai_stream.sse",
        format: BodyFormat::Sse,
        usage: Some((26, 3, 29)),
    },
];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/usage/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What a scan found: format, usage (if any), generated-text bytes.
type Found = (BodyFormat, Option<Usage>, u64);

fn scan<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Found {
    let mut s = UsageScanner::new(None);
    let mut total = 0;
    for c in chunks {
        total += c.len() as u64;
        s.feed(c);
    }
    s.finish();
    assert_eq!(s.body_bytes(), total);
    let fields = s.fields();
    let found = fields.prompt.is_some() || fields.completion.is_some() || fields.total.is_some();
    (
        s.format(),
        found.then(|| fields.normalise()),
        s.text_bytes(),
    )
}

#[test]
fn every_provider_whole_split_and_byte_by_byte() {
    for case in CASES {
        let body = fixture(case.file);
        let whole = scan([body.as_slice()]);
        let found = whole.1.map(|u: Usage| (u.prompt, u.completion, u.total));
        assert_eq!((whole.0, found), (case.format, case.usage), "{}", case.file);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(scan([a, b]), whole, "{} split at {at}", case.file);
        }
        assert_eq!(scan(body.chunks(1)), whole, "{} byte by byte", case.file);
    }
}

#[test]
fn generated_text_is_counted_for_estimates() {
    let body = fixture("openai_chat_stream_no_usage.sse");
    // "Sixteen bytes!!!" and the tool call's arguments {"a":1}.
    assert_eq!(scan([body.as_slice()]).2, 16 + 7);
    let body = fixture("anthropic_stream.sse");
    assert_eq!(scan([body.as_slice()]).2, 6);
    let body = fixture("dashscope.json");
    assert_eq!(
        scan([body.as_slice()]).2,
        "我是通义千问，由阿里云开发的大语言模型。".len() as u64
    );
}

#[test]
fn format_comes_from_the_content() {
    // Leading whitespace and blank lines decide nothing.
    let body = fixture("anthropic_stream.sse");
    let (format, usage, _) = scan([b"\r\n".as_slice(), body.as_slice()]);
    assert_eq!(format, BodyFormat::Sse);
    assert_eq!(usage.map(|u| u.total), Some(50));
    let body = fixture("openai_chat.json");
    let (format, usage, _) = scan([b"\n  ".as_slice(), body.as_slice()]);
    assert_eq!(format, BodyFormat::Json);
    assert_eq!(usage.map(|u| u.total), Some(1163));
}

#[test]
fn compressed_bodies_are_opaque() {
    let mut s = UsageScanner::new(Some("gzip"));
    s.feed(br#"{"usage":{"total_tokens":5}}"#);
    s.finish();
    assert_eq!(s.format(), BodyFormat::Opaque);
    assert_eq!(s.fields().total, None);
    assert_eq!(s.body_bytes(), 28);
    let mut s = UsageScanner::new(Some("identity"));
    s.feed(br#"{"usage":{"total_tokens":5}}"#);
    assert_eq!(s.fields().total, Some(5));
}

#[test]
fn a_multi_megabyte_event_is_scanned_in_constant_memory() {
    let mut s = UsageScanner::new(None);
    s.feed(br#"data: {"choices":[{"delta":{"content":""#);
    let filler = vec![b'x'; 64 * 1024];
    for _ in 0..64 {
        s.feed(&filler);
    }
    s.feed(b"\"}}],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n");
    s.finish();
    assert_eq!(s.fields().total, Some(3));
    assert_eq!(s.text_bytes(), 64 * 64 * 1024);
    // Fixed, whatever the input: the key, model, tier and response id it keeps, a few hundred
    // bytes.
    assert!(std::mem::size_of::<UsageScanner>() < 640);
}

/// Each provider's real response shape, priced: by the model the response names (the dated
/// snapshot, Anthropic's model in `message_start`, Gemini's `modelVersion`), cached prompt
/// tokens at their own price, reasoning (Gemini's thoughts) at the output price. The costs are
/// worked out by hand from the fixtures' figures.
#[test]
fn every_provider_is_priced_by_the_model_it_names() {
    use llm_token_ratelimit::pricing::{ModelMatch, Price, Prices, Rates, UnknownModel};
    // Cache writes at the input price here (this test is about which model prices them).
    let per_million = |input: u64, cached: u64, output: u64| {
        Price::from(Rates {
            input,
            cached_input: cached,
            output,
            reasoning: output,
            cache_write: input,
            cache_write_1h: input,
        })
    };
    let table = Prices {
        currency: "USD".into(),
        models: vec![
            // $2.50 / $1.25 cached / $10 per million, in micro units.
            (
                ModelMatch::Exact("gpt-4o-2024-08-06".into()),
                per_million(2_500_000, 1_250_000, 10_000_000),
            ),
            // $3 / $0.30 cached / $15.
            (
                ModelMatch::Prefix("claude-sonnet-4".into()),
                per_million(3_000_000, 300_000, 15_000_000),
            ),
            // $0.30 / $0.075 cached / $2.50.
            (
                ModelMatch::Prefix("gemini-2.5-flash".into()),
                per_million(300_000, 75_000, 2_500_000),
            ),
        ],
        unknown_model: UnknownModel::Deny,
        tiers: Vec::new(),
    };
    for (file, model, micros) in [
        // 1117 prompt of which 1024 cached, 46 completion:
        // 93 × 2.5 + 1024 × 1.25 + 46 × 10 = 1972.5 → 1973.
        ("openai_chat.json", "gpt-4o-2024-08-06", 1973),
        // 25 input + 10 cache reads, 15 output: 25 × 3 + 10 × 0.3 + 15 × 15 = 303.
        ("anthropic_stream.sse", "claude-sonnet-4-20250514", 303),
        // 8 prompt, 7 candidates + 30 thoughts: 8 × 0.3 + 37 × 2.5 = 94.9 → 95.
        ("gemini.json", "gemini-2.5-flash", 95),
    ] {
        let body = fixture(file);
        for cut in [1, body.len() / 2, body.len() - 1] {
            let mut s = UsageScanner::new(None);
            s.feed(&body[..cut]);
            s.feed(&body[cut..]);
            s.finish();
            assert_eq!(s.model(), Some(model), "{file} cut at {cut}");
            let price = table
                .price(s.model(), Some("what-the-client-asked"))
                .unwrap();
            assert_eq!(price.cost(&s.fields().normalise()), micros, "{file}");
        }
    }
}
