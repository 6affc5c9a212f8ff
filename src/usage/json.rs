//! An incremental JSON scanner that finds token usage wherever a provider puts it, fed any
//! number of chunks cut anywhere, in constant memory.
//!
//! It is a lexer, not a parser: it tracks the container depth, the last object key and whether
//! it is inside a usage object (`usage` or `usageMetadata` where an API puts it: see [`Holder`]), and
//! records the numbers whose keys name a usage field. Strings are never stored; the bytes of
//! generated-text strings (`content`, `text`, `delta`, …) are only counted, for the estimate used
//! when no usage arrives. Malformed input is skipped, never an error.

use super::fields::{Iterations, UsageFields};

/// Deepest container whose kind (object or array) is remembered; deeper nesting is still
/// counted, but holds nothing the scanner looks for.
const TRACKED_DEPTH: u32 = 128;
/// Longest key or number the scanner keeps; longer ones cannot be a usage field or count.
const SHORT: usize = 32;

/// Keys whose string values are generated text, for the estimate.
const TEXT_KEYS: &[&[u8]] = &[
    b"content",
    b"text",
    b"delta",
    b"reasoning_content",
    b"reasoning",
    b"thinking",
    b"partial_json",
    b"arguments",
    b"refusal",
];

/// The breakdown objects inside a usage object (OpenAI chat and Responses).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detail {
    None,
    /// `prompt_tokens_details` / `input_tokens_details`: `cached_tokens`.
    Prompt,
    /// `completion_tokens_details` / `output_tokens_details`: `reasoning_tokens`.
    Completion,
    /// Anthropic's `cache_creation`: `ephemeral_1h_input_tokens` (billed at another price).
    CacheCreation,
}

/// What holds the container at depth 2. An API puts its model and usage at the top of a
/// document, or one level down in exactly these places; anywhere else is data a client may
/// have filled (the Responses API echoes the client's `metadata`), never the price.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    Other,
    /// `response` (Responses API stream events).
    Response,
    /// `message` (Anthropic's `message_start`).
    Message,
    /// `x_groq` (Groq's stream: usage only).
    Groq,
    /// An item of a top-level array (Gemini's streamed JSON array).
    Item,
}

/// Longest service tier kept (Vertex's `PROVISIONED_THROUGHPUT` is 22; longer ones are none).
const TIER: usize = 24;

/// Longest response id kept (OpenAI's `resp_…` ids are about 50 bytes).
const ID: usize = 64;

/// Longest model name kept (Bedrock's `anthropic.claude-3-5-sonnet-20240620-v1:0` is 41).
const MODEL: usize = 80;

/// A short byte string that remembers whether it overflowed.
#[derive(Clone, Copy)]
struct Short<const N: usize = SHORT> {
    bytes: [u8; N],
    len: u8,
    overflow: bool,
}

impl<const N: usize> Short<N> {
    const EMPTY: Short<N> = Short {
        bytes: [0; N],
        len: 0,
        overflow: false,
    };

    fn push(&mut self, b: u8) {
        match self.bytes.get_mut(self.len as usize) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    /// The text, or `None` when it was too long to be anything the scanner wants.
    fn get(&self) -> Option<&[u8]> {
        if self.overflow {
            None
        } else {
            self.bytes.get(..self.len as usize)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    /// Inside a string; `escaped` after a backslash.
    Str { key: bool, escaped: bool },
    /// Inside a number or a literal (`true`, `null`, …).
    Bare,
}

/// See the module documentation.
#[derive(Clone)]
pub struct JsonScanner {
    lex: Lex,
    depth: u32,
    /// Bit `d - 1` is set when the container at depth `d` is an object.
    objects: u128,
    /// In an object, whether the next string is a key.
    expect_key: bool,
    key: Short,
    bare: Short,
    /// Depth of the usage object being read, 0 when outside one.
    usage_depth: u32,
    /// Inside the usage object's `…_tokens_details` object, which one.
    detail: Detail,
    /// What holds the current container at depth 2.
    holder: Holder,
    /// Depth of the usage object's `iterations` array (Anthropic), 0 outside one; its steps
    /// are summed into `fields.iterations` as they come.
    iterations_depth: u32,
    /// The current string value is generated text.
    counting_text: bool,
    /// The current string value is the response's `model` (`modelVersion` for Gemini).
    reading_model: bool,
    /// The last model the response named; `model_read` once its string ended within bounds.
    model_text: Short<MODEL>,
    model_read: bool,
    /// The response's `id` (top level, or in `response` / `message`), read as the model is: a
    /// stream the plugin ends echoes it.
    reading_id: bool,
    id_text: Short<ID>,
    id_read: bool,
    /// The service tier the answer was billed at (OpenAI's `service_tier`, Anthropic's
    /// `usage.service_tier`, Vertex AI's `usageMetadata.trafficType`), read as the model is.
    reading_tier: bool,
    tier_text: Short<TIER>,
    tier_read: bool,
    /// What was found so far; later values of a field replace earlier ones (providers send
    /// cumulative figures).
    pub fields: UsageFields,
    /// Bytes of generated-text strings seen.
    pub text_bytes: u64,
}

impl Default for JsonScanner {
    fn default() -> Self {
        JsonScanner {
            lex: Lex::Between,
            depth: 0,
            objects: 0,
            expect_key: false,
            key: Short::EMPTY,
            bare: Short::EMPTY,
            usage_depth: 0,
            detail: Detail::None,
            holder: Holder::Other,
            iterations_depth: 0,
            counting_text: false,
            reading_model: false,
            model_text: Short::EMPTY,
            model_read: false,
            reading_id: false,
            id_text: Short::EMPTY,
            id_read: false,
            reading_tier: false,
            tier_text: Short::EMPTY,
            tier_read: false,
            fields: UsageFields::default(),
            text_bytes: 0,
        }
    }
}

impl JsonScanner {
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            self.byte(b);
        }
    }

    /// Starts a new document (the next SSE event), keeping what was found.
    pub fn next_document(&mut self) {
        self.end_bare();
        *self = JsonScanner {
            fields: self.fields,
            text_bytes: self.text_bytes,
            model_text: self.model_text,
            model_read: self.model_read,
            id_text: self.id_text,
            id_read: self.id_read,
            tier_text: self.tier_text,
            tier_read: self.tier_read,
            ..JsonScanner::default()
        };
    }

    /// The model the response names (`model` near the top of a document, as OpenAI, Anthropic
    /// and Qwen write it; Gemini's `modelVersion`), if it fits in 80 bytes.
    pub fn model(&self) -> Option<&str> {
        self.model_text
            .get()
            .filter(|_| self.model_read)
            .and_then(|b| std::str::from_utf8(b).ok())
            .filter(|m| !m.is_empty())
    }

    /// The response's id, if it fits in 64 bytes.
    pub fn response_id(&self) -> Option<&str> {
        self.id_text
            .get()
            .filter(|_| self.id_read)
            .and_then(|b| std::str::from_utf8(b).ok())
            .filter(|m| !m.is_empty())
    }

    /// The service tier the answer names, if any.
    pub fn service_tier(&self) -> Option<&str> {
        self.tier_text
            .get()
            .filter(|_| self.tier_read)
            .and_then(|b| std::str::from_utf8(b).ok())
            .filter(|t| !t.is_empty())
    }

    fn in_object(&self) -> bool {
        (1..=TRACKED_DEPTH).contains(&self.depth) && self.objects & (1u128 << (self.depth - 1)) != 0
    }

    fn byte(&mut self, b: u8) {
        match self.lex {
            Lex::Str { key, escaped } => {
                if escaped {
                    self.lex = Lex::Str {
                        key,
                        escaped: false,
                    };
                    self.string_byte(key, b);
                } else if b == b'\\' {
                    self.lex = Lex::Str { key, escaped: true };
                } else if b == b'"' {
                    self.lex = Lex::Between;
                    self.counting_text = false;
                    if std::mem::take(&mut self.reading_model) {
                        self.model_read = true;
                    }
                    if std::mem::take(&mut self.reading_id) {
                        self.id_read = true;
                    }
                    if std::mem::take(&mut self.reading_tier) {
                        self.tier_read = true;
                    }
                } else {
                    self.string_byte(key, b);
                }
            }
            Lex::Bare => {
                if matches!(
                    b,
                    b',' | b'}' | b']' | b':' | b'"' | b'{' | b'[' | b' ' | b'\t' | b'\r' | b'\n'
                ) {
                    self.end_bare();
                    self.structural(b);
                } else {
                    self.bare.push(b);
                }
            }
            Lex::Between => self.structural(b),
        }
    }

    fn string_byte(&mut self, key: bool, b: u8) {
        if key {
            self.key.push(b);
        } else if self.counting_text {
            self.text_bytes += 1;
        } else if self.reading_model {
            self.model_text.push(b);
        } else if self.reading_id {
            self.id_text.push(b);
        } else if self.reading_tier {
            self.tier_text.push(b);
        }
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'{' | b'[' => self.open(b == b'{'),
            b'}' | b']' => self.close(),
            b',' => self.expect_key = self.in_object(),
            b':' => self.expect_key = false,
            b'"' => {
                let key = self.expect_key && self.in_object();
                if key {
                    self.key = Short::EMPTY;
                } else {
                    self.counting_text = self.usage_depth == 0
                        && self.in_object()
                        && self.key.get().is_some_and(|k| TEXT_KEYS.contains(&k));
                    self.reading_model = self.usage_depth == 0
                        && self.in_object()
                        && match self.depth {
                            1 => true,
                            2 => matches!(
                                self.holder,
                                Holder::Response | Holder::Message | Holder::Item
                            ),
                            _ => false,
                        }
                        && self
                            .key
                            .get()
                            .is_some_and(|k| k == b"model" || k == b"modelVersion");
                    if self.reading_model {
                        self.model_text = Short::EMPTY;
                        self.model_read = false;
                    }
                    self.reading_id = self.usage_depth == 0
                        && self.in_object()
                        && match self.depth {
                            1 => true,
                            2 => matches!(self.holder, Holder::Response | Holder::Message),
                            _ => false,
                        }
                        && self.key.get() == Some(b"id".as_slice());
                    if self.reading_id {
                        self.id_text = Short::EMPTY;
                        self.id_read = false;
                    }
                    // Vertex AI names the tier in `usageMetadata.trafficType`.
                    self.reading_tier = self.in_object()
                        && match self.key.get() {
                            Some(b"service_tier") => {
                                if self.usage_depth == 0 {
                                    self.depth == 1
                                        || (self.depth == 2 && self.holder == Holder::Response)
                                } else {
                                    self.depth == self.usage_depth
                                }
                            }
                            Some(b"trafficType") => {
                                self.usage_depth != 0 && self.depth == self.usage_depth
                            }
                            _ => false,
                        };
                    if self.reading_tier {
                        self.tier_text = Short::EMPTY;
                        self.tier_read = false;
                    }
                }
                self.lex = Lex::Str {
                    key,
                    escaped: false,
                };
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => {
                self.bare = Short::EMPTY;
                self.bare.push(b);
                self.lex = Lex::Bare;
            }
        }
    }

    fn open(&mut self, object: bool) {
        let detail = if self.usage_depth != 0 && self.depth == self.usage_depth && object {
            match self.key.get() {
                Some(b"prompt_tokens_details" | b"input_tokens_details") => Detail::Prompt,
                Some(b"completion_tokens_details" | b"output_tokens_details") => Detail::Completion,
                Some(b"cache_creation") => Detail::CacheCreation,
                _ => Detail::None,
            }
        } else {
            Detail::None
        };
        let opens_usage = self.usage_depth == 0
            && self.in_object()
            && (self.depth == 1 || (self.depth == 2 && self.holder != Holder::Other))
            && self
                .key
                .get()
                .is_some_and(|k| k == b"usage" || k == b"usageMetadata");
        if self.depth == 1 {
            self.holder = if !self.in_object() {
                Holder::Item
            } else {
                match self.key.get() {
                    Some(b"response") => Holder::Response,
                    Some(b"message") => Holder::Message,
                    Some(b"x_groq") => Holder::Groq,
                    _ => Holder::Other,
                }
            };
        }
        self.depth = self.depth.saturating_add(1);
        if self.depth <= TRACKED_DEPTH {
            let bit = 1u128 << (self.depth - 1);
            if object {
                self.objects |= bit;
            } else {
                self.objects &= !bit;
            }
        }
        if opens_usage && object {
            self.usage_depth = self.depth;
        }
        if object && self.iterations_depth != 0 && self.depth == self.iterations_depth + 1 {
            if let Some(steps) = &mut self.fields.iterations {
                steps.steps += 1;
            }
        }
        // Anthropic's `usage.iterations`: a new array starts a new sum (later ones replace
        // earlier ones, as every usage figure does).
        if !object
            && self.usage_depth != 0
            && self.depth == self.usage_depth + 1
            && self.key.get() == Some(b"iterations")
        {
            self.iterations_depth = self.depth;
            self.fields.iterations = Some(Iterations::default());
        }
        if detail != Detail::None {
            self.detail = detail;
        }
        self.expect_key = object;
        self.key = Short::EMPTY;
    }

    fn close(&mut self) {
        if self.depth == 0 {
            return;
        }
        if self.depth == self.usage_depth {
            self.usage_depth = 0;
        }
        if self.usage_depth != 0 && self.depth == self.usage_depth + 1 {
            self.detail = Detail::None;
        }
        if self.iterations_depth != 0 && self.depth == self.iterations_depth {
            self.iterations_depth = 0;
        }
        self.depth -= 1;
        self.expect_key = false;
    }

    /// A number or literal ended: record it when it is a usage field.
    fn end_bare(&mut self) {
        if self.lex != Lex::Bare {
            return;
        }
        self.lex = Lex::Between;
        if self.usage_depth == 0 {
            return;
        }
        let (Some(key), Some(text)) = (self.key.get(), self.bare.get()) else {
            return;
        };
        let Some(n) = parse_count(text) else {
            return;
        };
        if self.depth == self.usage_depth {
            self.fields.set(key, n);
        } else if self.iterations_depth != 0 && self.depth == self.iterations_depth + 1 {
            if let Some(steps) = &mut self.fields.iterations {
                steps.add(key, n);
            }
        } else if self.depth == self.usage_depth + 1 {
            match (self.detail, key) {
                (Detail::Prompt, b"cached_tokens") => self.fields.cached = Some(n),
                (Detail::Completion, b"reasoning_tokens") => self.fields.reasoning = Some(n),
                (Detail::CacheCreation, b"ephemeral_1h_input_tokens") => {
                    self.fields.cache_write_1h = Some(n)
                }
                _ => {}
            }
        }
    }
}

/// A token count as providers write it: a non-negative integer. A fraction is rounded down
/// (some servers write `12.0`); a negative, non-numeric or absurd value (over 10^15) is ignored.
pub fn parse_count(text: &[u8]) -> Option<u64> {
    const ABSURD: f64 = 1e15;
    let s = std::str::from_utf8(text).ok()?;
    if let Ok(n) = s.parse::<u64>() {
        return (n as f64 <= ABSURD).then_some(n);
    }
    let f: f64 = s.parse().ok()?;
    (f.is_finite() && (0.0..=ABSURD).contains(&f)).then_some(f as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(doc: &str) -> JsonScanner {
        let mut s = JsonScanner::default();
        s.feed(doc.as_bytes());
        s.next_document();
        s
    }

    #[test]
    fn the_model_the_response_names_is_kept() {
        // OpenAI and Qwen at the top, Anthropic's stream in `message`, Gemini's `modelVersion`.
        for (doc, want) in [
            (
                r#"{"id": "x", "model": "gpt-4o-2024-08-06", "usage": {"total_tokens": 1}}"#,
                Some("gpt-4o-2024-08-06"),
            ),
            (
                r#"{"type": "message_start", "message": {"model": "claude-3-5-sonnet-20241022"}}"#,
                Some("claude-3-5-sonnet-20241022"),
            ),
            (
                r#"{"candidates": [], "modelVersion": "gemini-1.5-pro-002"}"#,
                Some("gemini-1.5-pro-002"),
            ),
            // A model named deep in someone's data, a number, or a name too long: not kept.
            (
                r#"{"choices": [{"message": {"tool_calls": [{"function": {"arguments": {"model": "x"}}}]}}]}"#,
                None,
            ),
            (r#"{"model": 5}"#, None),
            (&format!(r#"{{"model": "{}"}}"#, "m".repeat(200)), None),
        ] {
            assert_eq!(scan(doc).model(), want, "{doc}");
        }
        // Cut anywhere, and kept across the documents of a stream.
        let doc = r#"{"model": "qwen-max"}"#;
        for cut in 0..doc.len() {
            let mut s = JsonScanner::default();
            s.feed(&doc.as_bytes()[..cut]);
            s.feed(&doc.as_bytes()[cut..]);
            s.next_document();
            s.feed(br#"{"usage": {"total_tokens": 3}}"#);
            s.next_document();
            assert_eq!(s.model(), Some("qwen-max"), "cut at {cut}");
        }
    }

    /// The Responses API echoes the client's `metadata`; a compatible server may echo anything
    /// it was sent. A model or usage the client wrote there is not the price.
    #[test]
    fn a_model_or_usage_the_client_filled_in_is_not_read() {
        for (doc, want) in [
            // Responses JSON: `metadata` comes after `model` and after `usage`.
            (
                r#"{"object":"response","model":"gpt-4o","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12},
                   "metadata":{"model":"gpt-4o-mini","usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0}}}"#,
                "gpt-4o",
            ),
            // Responses stream: `response.metadata` is one level deeper still.
            (
                r#"{"type":"response.completed","response":{"model":"gpt-4o","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12},
                   "metadata":{"model":"gpt-4o-mini","usage":{"total_tokens":0}}}}"#,
                "gpt-4o",
            ),
            // Chat completions echoing `metadata` at the top.
            (
                r#"{"model":"gpt-4o","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12},
                   "metadata":{"model":"gpt-4o-mini","usage":{"total_tokens":0}},
                   "choices":[{"message":{"model":"x","usage":{"total_tokens":0}}}]}"#,
                "gpt-4o",
            ),
            // Anthropic's `message_start` with an echoed field inside `message`.
            (
                r#"{"type":"message_start","message":{"model":"claude-opus-4","usage":{"input_tokens":5,"output_tokens":7},
                   "metadata":{"model":"claude-haiku","usage":{"input_tokens":0}}}}"#,
                "claude-opus-4",
            ),
        ] {
            let s = scan(doc);
            assert_eq!(s.model(), Some(want), "{doc}");
            assert_eq!(
                s.fields.total.or(s.fields.completion.map(|c| c + 5)),
                Some(12),
                "{doc}"
            );
        }
        // Gemini's streamed array and Groq's `x_groq` are still read one level down.
        let s = scan(
            r#"[{"modelVersion":"gemini-2.5-pro","usageMetadata":{"totalTokenCount":9},"metadata":{"modelVersion":"flash"}}]"#,
        );
        assert_eq!(
            (s.model(), s.fields.total),
            (Some("gemini-2.5-pro"), Some(9))
        );
        let s = scan(r#"{"model":"llama","x_groq":{"usage":{"total_tokens":4}}}"#);
        assert_eq!(s.fields.total, Some(4));
    }

    /// The tier an answer was billed at, where each API says it: OpenAI's top-level (and the
    /// Responses stream's `response.service_tier`), Anthropic's `usage.service_tier`, Vertex
    /// AI's `usageMetadata.trafficType`; never a client's echoed field.
    #[test]
    fn the_service_tier_is_read_where_the_api_puts_it() {
        for (doc, want) in [
            (
                r#"{"model":"gpt-4o","service_tier":"priority","usage":{"total_tokens":1}}"#,
                Some("priority"),
            ),
            (
                r#"{"type":"response.completed","response":{"service_tier":"flex"}}"#,
                Some("flex"),
            ),
            (
                r#"{"type":"message_delta","usage":{"output_tokens":3,"service_tier":"priority"}}"#,
                Some("priority"),
            ),
            (
                r#"{"metadata":{"service_tier":"flex"},"choices":[{"service_tier":"flex"}]}"#,
                None,
            ),
            (
                r#"{"usageMetadata":{"totalTokenCount":3,"trafficType":"ON_DEMAND_FLEX"}}"#,
                Some("ON_DEMAND_FLEX"),
            ),
            // Vertex's longest names fit.
            (
                r#"{"usageMetadata":{"trafficType":"ON_DEMAND_PRIORITY"}}"#,
                Some("ON_DEMAND_PRIORITY"),
            ),
            (
                r#"{"usageMetadata":{"trafficType":"PROVISIONED_THROUGHPUT"}}"#,
                Some("PROVISIONED_THROUGHPUT"),
            ),
            (
                r#"{"trafficType":"ON_DEMAND_FLEX","usageMetadata":{}}"#,
                None,
            ),
        ] {
            assert_eq!(scan(doc).service_tier(), want, "{doc}");
        }
    }

    /// Anthropic bills every step of `usage.iterations` (context compaction, the advisor); the
    /// top-level figures are the last step's only. Gemini's tool-use prompt is in its total but
    /// not in its prompt count.
    #[test]
    fn every_billed_step_is_counted() {
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},
            "usage":{"input_tokens":45000,"output_tokens":1234,"cache_read_input_tokens":500,
              "iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},
                            {"type":"message","input_tokens":23000,"output_tokens":1000}]}}"#;
        for cut in [0, 60, 150, delta.len() - 3] {
            let mut s = JsonScanner::default();
            s.feed(&delta.as_bytes()[..cut]);
            s.feed(&delta.as_bytes()[cut..]);
            s.next_document();
            let u = s.fields.normalise();
            assert_eq!(
                (u.prompt, u.completion, u.cached),
                (203_500, 4500, 500),
                "cut {cut}"
            );
        }
        // Steps that give their own cache figures; an empty list leaves the top level.
        let s = scan(
            r#"{"usage":{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":7,
               "iterations":[{"input_tokens":100,"output_tokens":50,"cache_read_input_tokens":20},
                             {"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":7}]}}"#,
        );
        assert_eq!(s.fields.normalise().prompt, 110 + 27);
        let s = scan(r#"{"usage":{"input_tokens":10,"output_tokens":5,"iterations":[]}}"#);
        assert_eq!(s.fields.normalise().total, 15);
        // An `iterations` a client filled elsewhere is not usage.
        let s = scan(
            r#"{"metadata":{"iterations":[{"input_tokens":0}]},"usage":{"input_tokens":10,"output_tokens":5}}"#,
        );
        assert_eq!(s.fields.normalise().total, 15);
        let s = scan(
            r#"{"usageMetadata":{"promptTokenCount":100,"toolUsePromptTokenCount":4610,"candidatesTokenCount":20,"totalTokenCount":4730}}"#,
        );
        let u = s.fields.normalise();
        assert_eq!((u.prompt, u.completion, u.total), (4710, 20, 4730));
        // Anthropic's cache writes, split into 5-minute and 1-hour ones.
        let s = scan(
            r#"{"usage":{"input_tokens":100,"cache_creation_input_tokens":500,"cache_read_input_tokens":50,
               "cache_creation":{"ephemeral_5m_input_tokens":300,"ephemeral_1h_input_tokens":200},"output_tokens":9}}"#,
        );
        let u = s.fields.normalise();
        assert_eq!(
            (u.prompt, u.cached, u.cache_write, u.cache_write_1h),
            (650, 50, 300, 200)
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_count(b"42"), Some(42));
        assert_eq!(parse_count(b"12.9"), Some(12));
        assert_eq!(parse_count(b"1e3"), Some(1000));
        assert_eq!(parse_count(b"-3"), None);
        assert_eq!(parse_count(b"null"), None);
        assert_eq!(parse_count(b"99999999999999999999999"), None);
        assert_eq!(parse_count(b"1e400"), None);
        assert_eq!(parse_count(b"NaN"), None);
    }

    #[test]
    fn usage_only_at_the_top() {
        let s = scan(
            r#"{"choices":[{"message":{"content":"hi","tool_calls":[{"function":{"arguments":{"usage":{"prompt_tokens":999}}}}]}}],
               "usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,
                        "prompt_tokens_details":{"cached_tokens":2}}}"#,
        );
        assert_eq!(
            (s.fields.prompt, s.fields.completion, s.fields.total),
            (Some(3), Some(5), Some(8))
        );
        assert_eq!(s.fields.cached, Some(2));
        assert_eq!(s.text_bytes, 2);
    }

    #[test]
    fn cached_and_reasoning_tokens_from_the_breakdowns() {
        let doc = r#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,
            "prompt_tokens_details":{"cached_tokens":80,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":30,"cached_tokens":999}}}"#;
        // Cut at every byte: the breakdown survives any chunking.
        for cut in 0..doc.len() {
            let mut s = JsonScanner::default();
            s.feed(&doc.as_bytes()[..cut]);
            s.feed(&doc.as_bytes()[cut..]);
            s.next_document();
            assert_eq!(
                (s.fields.cached, s.fields.reasoning),
                (Some(80), Some(30)),
                "cut {cut}"
            );
        }
        // The Responses API's names, and a `cached_tokens` outside any breakdown is not one.
        let s = scan(
            r#"{"response":{"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":4},
               "output_tokens":7,"output_tokens_details":{"reasoning_tokens":5},"cached_tokens":9}}}"#,
        );
        assert_eq!((s.fields.cached, s.fields.reasoning), (Some(4), Some(5)));
        // Gemini names them at the top of usageMetadata.
        let s = scan(
            r#"{"usageMetadata":{"promptTokenCount":20,"cachedContentTokenCount":12,"candidatesTokenCount":3,"thoughtsTokenCount":6}}"#,
        );
        assert_eq!((s.fields.cached, s.fields.thoughts), (Some(12), Some(6)));
    }

    #[test]
    fn strings_that_look_like_structure_are_text() {
        let s = scan(
            r#"{"content":"a \"usage\": {\"total_tokens\": 5} \\","usage":{"total_tokens":7}}"#,
        );
        assert_eq!(s.fields.total, Some(7));
        assert_eq!(s.text_bytes, 32);
    }

    #[test]
    fn malformed_input_is_skipped() {
        let mut s = JsonScanner::default();
        s.feed(b"}}]]{\"usage\":{\"total_tokens\":,,:5}}");
        s.feed(&[0xff, b'"', 0, b'{']);
        s.next_document();
        s.feed(br#"{"usage":{"total_tokens":9}}"#);
        s.next_document();
        assert_eq!(s.fields.total, Some(9));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let deep = "[".repeat(100_000) + "]".repeat(100_000).as_str();
        let s = scan(&(deep + r#"{"usage":{"total_tokens":4}}"#));
        assert_eq!(s.fields.total, Some(4));
        let s = scan(&("{\"a\":".repeat(200) + r#"{"usage":{"total_tokens":4}}"#));
        assert_eq!(s.fields.total, None);
    }
}
