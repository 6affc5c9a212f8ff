//! The JSON request body as the upstreams read it: the few facts limiting needs (model, output
//! caps, number of choices, streaming) and the plugin's edits to it (asking for usage in the
//! stream, writing the reserved cap), in one pass over the bytes and with no document tree, so
//! memory stays a small multiple of the body whatever its shape.
//!
//! Upstreams' parsers are more lenient than `serde_json`. Python's `json` (so FastAPI, vLLM and
//! most gateways) accepts `NaN`, `Infinity`, `-Infinity`, a UTF-8 byte order mark and lone
//! surrogate escapes; pydantic reads `"stream": "true"` or `1` as `true`; every common parser
//! takes the last of a repeated key. A body that reads one way to the plugin and another to the
//! upstream is a way around a limit, so this reader accepts all of that and reads it as they do.
//! What it still cannot read (not JSON, not an object, another encoding) is *unreadable*: the
//! caller then reserves and charges as for a request it knows nothing about, never less.

use crate::text::from_wire;

/// Where a value sits in the body: byte offsets, the end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// The output cap fields an API may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    /// OpenAI chat and completions, Anthropic Messages.
    MaxTokens,
    /// OpenAI's newer name for `max_tokens`.
    MaxCompletionTokens,
    /// The Responses API.
    MaxOutputTokens,
    /// Gemini: `generationConfig.maxOutputTokens` (or its snake-case spelling).
    GeminiMaxOutputTokens,
}

/// An object value's closing brace and whether it has members: where a member is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Object {
    close: usize,
    empty: bool,
}

/// `stream_options` as its last occurrence has it (the one upstreams read).
#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamOptions {
    Object {
        at: Object,
        /// Every `include_usage` value in it, and what the last one says.
        include_usage: Vec<Span>,
        asks: bool,
    },
    /// `null`, `false`, a string…: replaced whole.
    Other(Span),
}

/// What the JSON request body says that matters for limiting, and where, for the edits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `model`, when its last occurrence is a string.
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    /// Gemini's `generationConfig.maxOutputTokens`.
    pub generation_config: Option<u64>,
    /// `n` (OpenAI), `best_of` (legacy completions: billed for every candidate) and Gemini's
    /// `candidateCount`, as the client wrote them.
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub candidate_count: Option<u64>,
    pub stream: Option<bool>,
    /// Just after the top-level `{`; its `}`; whether it has members.
    open: usize,
    top: Object,
    stream_options: Option<StreamOptions>,
    /// Every output cap field's value, with what it says (`None`: not a number).
    caps: Vec<(CapField, Span, Option<u64>)>,
    /// The last `generationConfig` object, or the span of a last one that is not an object.
    gemini_config: Option<Object>,
    gemini_other: Option<Span>,
    spellings: Spellings,
}

/// The most choices a request is reserved for: OpenAI allows `n` up to 128.
pub const MAX_CHOICES: u64 = 128;

impl BodyFacts {
    /// Reads a JSON request body; `None` when it cannot be read (see the module's rules).
    pub fn parse(body: &[u8]) -> Option<BodyFacts> {
        Reader { b: body, i: 0 }.document()
    }

    /// The most output tokens one choice may produce, read from the fields `api` reads (a
    /// cap in a field the endpoint ignores caps nothing): the largest when several are given.
    /// For an API the plugin does not know, every field counts (the largest).
    pub fn output_token_cap(&self, api: Api) -> Option<u64> {
        let fields = match api {
            Api::Chat => [self.max_tokens, self.max_completion_tokens, None, None],
            Api::Completions | Api::Messages => [self.max_tokens, None, None, None],
            Api::Responses => [self.max_output_tokens, None, None, None],
            Api::Gemini => [self.generation_config, None, None, None],
            Api::Other => [
                self.max_tokens,
                self.max_completion_tokens,
                self.max_output_tokens,
                self.generation_config,
            ],
        };
        fields.into_iter().flatten().max()
    }

    /// How many choices a stream of the answer carries (`n`), from 1 to [`MAX_CHOICES`].
    pub fn streamed_choices(&self) -> u32 {
        self.n.unwrap_or(1).clamp(1, MAX_CHOICES) as u32
    }

    /// How many outputs the request is billed for: the largest of `n`, `best_of` and
    /// `candidateCount`, from 1 to [`MAX_CHOICES`].
    pub fn choices(&self) -> u64 {
        [self.n, self.best_of, self.candidate_count]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(1)
            .clamp(1, MAX_CHOICES)
    }

    fn spelled(&mut self, name: &'static str, key: &[u8]) {
        self.spellings.note(name, key);
    }

    /// Whether a streamed answer would carry usage without the plugin's help: the last
    /// `stream_options` is an object whose last `include_usage` is true.
    pub fn asks_for_usage(&self) -> bool {
        matches!(
            self.stream_options,
            Some(StreamOptions::Object { asks: true, .. })
        )
    }

    /// Whether the request streams without asking for usage (which the plugin then asks for).
    pub fn needs_stream_usage(&self) -> bool {
        self.stream == Some(true) && !self.asks_for_usage()
    }
}

/// Which API a request is for, from its path: where an output cap is written when the
/// request states none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    Messages,
    Responses,
    Gemini,
    Other,
}

impl Api {
    /// `path` without its query string.
    pub fn of(path: &str) -> Api {
        if path.ends_with("/chat/completions") {
            Api::Chat
        } else if path.ends_with("/completions") {
            Api::Completions
        } else if path.ends_with("/messages") {
            Api::Messages
        } else if path.ends_with("/responses") {
            Api::Responses
        } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
            Api::Gemini
        } else {
            Api::Other
        }
    }
}

/// The model a Gemini or Vertex AI request names in its path
/// (`/v1beta/models/gemini-2.5-flash:generateContent`,
/// `…/publishers/google/models/gemini-2.5-pro:streamGenerateContent`, Claude on Vertex's
/// `…/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict`): those APIs
/// route by it, and their bodies name none. `path` is normalised (no query).
pub fn path_model(path: &str) -> Option<&str> {
    if crate::text::is_opaque(path) {
        return None;
    }
    let (parent, last) = path.rsplit_once('/')?;
    let (model, method) = last.rsplit_once(':')?;
    // Vertex AI serves partner models (Claude) on `:rawPredict`, others on `:predict`.
    let routed = matches!(
        method,
        "generateContent" | "streamGenerateContent" | "rawPredict" | "streamRawPredict" | "predict"
    );
    (routed && parent.ends_with("/models") && !model.is_empty() && model.len() <= 256)
        .then_some(model)
}

/// What the plugin changes in a request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Edits {
    /// Ask for usage in the stream (`stream_options.include_usage: true`).
    pub stream_usage: bool,
    /// The most output tokens per choice the upstream may produce, and the API (for where to
    /// write it when the request states no cap).
    pub cap: Option<(u64, Api)>,
}

/// The body with `edits` made, or `None` when nothing changes. Every byte the plugin does not
/// edit stays as the client sent it; a field the upstream reads the last of is changed in its
/// last occurrence (or every occurrence), so the upstream reads what the plugin meant.
pub fn rewrite(body: &[u8], facts: &BodyFacts, edits: Edits) -> Option<Vec<u8>> {
    // (position, bytes removed from there, bytes put there)
    let mut splices: Vec<(usize, usize, String)> = Vec::new();
    let mut front: Vec<String> = Vec::new();
    let replace = |splices: &mut Vec<(usize, usize, String)>, span: Span, with: String| {
        splices.push((span.start, span.end.saturating_sub(span.start), with));
    };
    let add_member = |splices: &mut Vec<(usize, usize, String)>, at: Object, member: String| {
        let sep = if at.empty { "" } else { "," };
        splices.push((at.close, 0, format!("{sep}{member}")));
    };
    if edits.stream_usage && facts.needs_stream_usage() {
        match &facts.stream_options {
            None => front.push(r#""stream_options":{"include_usage":true}"#.into()),
            Some(StreamOptions::Other(span)) => {
                replace(&mut splices, *span, r#"{"include_usage":true}"#.into())
            }
            Some(StreamOptions::Object {
                include_usage, at, ..
            }) => {
                if include_usage.is_empty() {
                    add_member(&mut splices, *at, r#""include_usage":true"#.into());
                }
                for span in include_usage {
                    replace(&mut splices, *span, "true".into());
                }
            }
        }
    }
    if let Some((cap, api)) = edits.cap {
        // The API's own field, in any spelling, is rewritten where it is (below); only when
        // the request has none is it added (a second spelling would make the body ambiguous).
        let own = |field: CapField| match api {
            Api::Chat => matches!(field, CapField::MaxTokens | CapField::MaxCompletionTokens),
            Api::Completions | Api::Messages => field == CapField::MaxTokens,
            Api::Responses => field == CapField::MaxOutputTokens,
            Api::Gemini => field == CapField::GeminiMaxOutputTokens,
            Api::Other => true,
        };
        if !facts.caps.iter().any(|(field, _, _)| own(*field)) {
            match api {
                Api::Chat => front.push(format!(r#""max_completion_tokens":{cap}"#)),
                Api::Completions | Api::Messages => front.push(format!(r#""max_tokens":{cap}"#)),
                Api::Responses => front.push(format!(r#""max_output_tokens":{cap}"#)),
                Api::Gemini => match (facts.gemini_config, facts.gemini_other) {
                    (Some(at), _) => {
                        add_member(&mut splices, at, format!(r#""maxOutputTokens":{cap}"#))
                    }
                    // Not an object: replaced by one (in its own spelling of the key).
                    (None, Some(span)) => replace(
                        &mut splices,
                        span,
                        format!(r#"{{"maxOutputTokens":{cap}}}"#),
                    ),
                    (None, None) => {
                        front.push(format!(r#""generationConfig":{{"maxOutputTokens":{cap}}}"#))
                    }
                },
                Api::Other => {}
            }
        }
        for (_, span, stated) in &facts.caps {
            if stated.map_or(true, |s| s > cap) {
                replace(&mut splices, *span, cap.to_string());
            }
        }
    }
    if !front.is_empty() {
        let sep = if facts.top.empty { "" } else { "," };
        splices.push((facts.open, 0, format!("{}{sep}", front.join(","))));
    }
    if splices.is_empty() {
        return None;
    }
    splices.sort_by_key(|s| s.0);
    let grows: usize = splices.iter().map(|s| s.2.len()).sum();
    let mut out = Vec::with_capacity(body.len() + grows);
    let mut at = 0;
    for (pos, removed, with) in splices {
        // Spans never overlap; a malformed plan is refused rather than applied.
        out.extend_from_slice(body.get(at..pos)?);
        out.extend_from_slice(with.as_bytes());
        at = pos.checked_add(removed)?;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

/// An output cap as a client may write it: a count (below) of at least 1. Zero or less is no
/// cap at all (Ollama and llama.cpp read `-1` as "no limit"), so it reserves the default.
fn cap(text: &[u8]) -> Option<u64> {
    count(text).filter(|n| *n > 0)
}

/// A count as a client may write it: any JSON number (negative → 0, fractions round up, too
/// large or `Infinity` saturates, `NaN` is none) or a string holding one.
fn count(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    let f: f64 = text.parse().ok()?;
    // `as` saturates: negatives become 0, huge values `u64::MAX`.
    (!f.is_nan()).then(|| f.ceil() as u64)
}

/// A boolean as pydantic's lax mode reads one (`true`, `1`, `"yes"`, `"on"`…).
fn lax_bool(text: &[u8]) -> Option<bool> {
    let t = std::str::from_utf8(text).ok()?.trim().to_ascii_lowercase();
    match t.as_str() {
        "true" | "yes" | "y" | "on" | "t" => Some(true),
        "false" | "no" | "n" | "off" | "f" => Some(false),
        // Numbers: 1 and 0 however written (`1.00`, `1e0`).
        number => {
            let n = number.parse::<f64>().ok()?;
            (n == 1.0 || n == 0.0).then_some(n == 1.0)
        }
    }
}

/// A scalar value: a string's decoded bytes, or a bare token (number, literal) as written.
enum Scalar {
    Str(Vec<u8>),
    Bare(Vec<u8>),
    /// An object or array (skipped).
    Container,
}

impl Scalar {
    fn text(&self) -> Option<&[u8]> {
        match self {
            Scalar::Str(b) | Scalar::Bare(b) => Some(b),
            Scalar::Container => None,
        }
    }
}

/// Longest key compared with the field names (longer ones are someone else's).
const MAX_KEY: usize = 32;

/// The top-level fields the reader looks at, by the name it gives them.
const TOP_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "generation_config",
];

/// Inside `generationConfig`.
const GEMINI_FIELDS: &[&str] = &["max_output_tokens", "candidate_count"];

/// The field `key` names, if any of `names`. Go's `encoding/json` (Ollama, many gateways)
/// matches keys to fields without regard to case, and Gemini's JSON takes camelCase and
/// snake_case alike, so a key is compared with ASCII case and underscores ignored:
/// `"Model"`, `"MAX_TOKENS"`, `"maxOutputTokens"` are fields too.
fn field_name(key: &[u8], names: &[&'static str]) -> Option<&'static str> {
    let folded: Vec<u8> = key
        .iter()
        .filter(|b| **b != b'_')
        .map(u8::to_ascii_lowercase)
        .collect();
    names
        .iter()
        .copied()
        .find(|n| n.bytes().filter(|b| *b != b'_').eq(folded.iter().copied()))
}

/// The spellings each field was given. One field under two spellings (`"model"` and `"Model"`)
/// is read one way by a case-sensitive parser (Python) and another by a case-insensitive one
/// (Go): the plugin cannot tell which the upstream takes, so the body is unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Spellings {
    seen: Vec<(&'static str, Vec<u8>)>,
    conflict: bool,
}

impl Spellings {
    fn note(&mut self, name: &'static str, key: &[u8]) {
        match self.seen.iter().find(|(n, _)| *n == name) {
            Some((_, spelling)) => self.conflict |= spelling.as_slice() != key,
            None => self.seen.push((name, key.to_vec())),
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Consumes `c`, or `None` when the next byte is another.
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn document(&mut self) -> Option<BodyFacts> {
        if self.b.starts_with(b"\xef\xbb\xbf") {
            self.i = 3;
        }
        self.ws();
        self.eat(b'{')?;
        let mut f = BodyFacts {
            open: self.i,
            ..BodyFacts::default()
        };
        f.top = self.members(|r, key| r.top_member(&mut f, key))?;
        self.ws();
        (self.i == self.b.len() && !f.spellings.conflict).then_some(f)
    }

    /// An object's members after its `{`, each handed to `member` (which reads the value);
    /// returns where the object closes.
    fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>,
    ) -> Option<Object> {
        self.ws();
        if self.peek()? == b'}' {
            let close = self.i;
            self.i += 1;
            return Some(Object { close, empty: true });
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, &key)?;
            self.ws();
            match self.next()? {
                b',' => continue,
                b'}' => {
                    return Some(Object {
                        close: self.i - 1,
                        empty: false,
                    })
                }
                _ => return None,
            }
        }
    }

    fn top_member(&mut self, f: &mut BodyFacts, key: &[u8]) -> Option<()> {
        let start = self.i;
        let Some(name) = field_name(key, TOP_FIELDS) else {
            return self.skip();
        };
        f.spelled(name, key);
        match name {
            "model" => {
                f.model = match self.scalar()? {
                    Scalar::Str(s) => Some(from_wire(s)),
                    _ => None,
                };
            }
            "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                let value = self.scalar()?.text().and_then(cap);
                let (field, slot) = match name {
                    "max_tokens" => (CapField::MaxTokens, &mut f.max_tokens),
                    "max_completion_tokens" => {
                        (CapField::MaxCompletionTokens, &mut f.max_completion_tokens)
                    }
                    _ => (CapField::MaxOutputTokens, &mut f.max_output_tokens),
                };
                *slot = value;
                let span = Span { start, end: self.i };
                f.caps.push((field, span, value));
            }
            "n" => f.n = self.scalar()?.text().and_then(count),
            "best_of" => f.best_of = self.scalar()?.text().and_then(count),
            "stream" => f.stream = self.scalar()?.text().and_then(lax_bool),
            "stream_options" => {
                if self.peek()? == b'{' {
                    self.i += 1;
                    let (mut spans, mut asks) = (Vec::new(), false);
                    let mut spellings = Spellings::default();
                    let at = self.members(|r, k| {
                        let Some(inner) = field_name(k, &["include_usage"]) else {
                            return r.skip();
                        };
                        spellings.note(inner, k);
                        let start = r.i;
                        asks = r.scalar()?.text().and_then(lax_bool) == Some(true);
                        spans.push(Span { start, end: r.i });
                        Some(())
                    })?;
                    f.spellings.conflict |= spellings.conflict;
                    f.stream_options = Some(StreamOptions::Object {
                        at,
                        include_usage: spans,
                        asks,
                    });
                } else {
                    self.skip()?;
                    f.stream_options = Some(StreamOptions::Other(Span { start, end: self.i }));
                }
            }
            _ => {
                // generationConfig (or its snake-case spelling)
                if self.peek()? == b'{' {
                    self.i += 1;
                    let (mut max, mut candidates) = (None, None);
                    let mut caps = Vec::new();
                    let mut spellings = Spellings::default();
                    let at = self.members(|r, k| {
                        let inner = field_name(k, GEMINI_FIELDS);
                        if let Some(inner) = inner {
                            spellings.note(inner, k);
                        }
                        match inner {
                            Some("max_output_tokens") => {
                                let start = r.i;
                                max = r.scalar()?.text().and_then(cap);
                                caps.push((
                                    CapField::GeminiMaxOutputTokens,
                                    Span { start, end: r.i },
                                    max,
                                ));
                                Some(())
                            }
                            Some(_) => {
                                candidates = r.scalar()?.text().and_then(count);
                                Some(())
                            }
                            None => r.skip(),
                        }
                    })?;
                    f.spellings.conflict |= spellings.conflict;
                    f.generation_config = max;
                    f.candidate_count = candidates;
                    // The upstream reads the last `generationConfig` only: an earlier one's
                    // cap is no cap of this request.
                    f.caps
                        .retain(|(field, ..)| *field != CapField::GeminiMaxOutputTokens);
                    f.caps.extend(caps);
                    f.gemini_config = Some(at);
                    f.gemini_other = None;
                } else {
                    self.skip()?;
                    f.caps
                        .retain(|(field, ..)| *field != CapField::GeminiMaxOutputTokens);
                    f.generation_config = None;
                    f.candidate_count = None;
                    f.gemini_config = None;
                    f.gemini_other = Some(Span { start, end: self.i });
                }
            }
        }
        Some(())
    }

    /// A key: a string, decoded, at most [`MAX_KEY`] bytes (a longer one is returned cut,
    /// and then matches no field name, which are all shorter).
    fn key(&mut self) -> Option<Vec<u8>> {
        if self.peek()? != b'"' {
            return None;
        }
        self.string(MAX_KEY + 1)
    }

    /// A string after its opening quote has been seen (at `self.i`), decoded, keeping at most
    /// `keep` bytes. Escapes are decoded as Python's `json` does; a lone surrogate becomes
    /// U+FFFD.
    fn string(&mut self, keep: usize) -> Option<Vec<u8>> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        let push = |out: &mut Vec<u8>, bytes: &[u8]| {
            let room = keep.saturating_sub(out.len());
            out.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        };
        loop {
            match self.next()? {
                b'"' => return Some(out),
                b'\\' => {
                    let c = match self.next()? {
                        b'u' => {
                            let mut unit = self.hex4()?;
                            if (0xD800..0xDC00).contains(&unit)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                let save = self.i;
                                self.i += 2;
                                match self.hex4() {
                                    Some(low) if (0xDC00..0xE000).contains(&low) => {
                                        unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                                    }
                                    _ => self.i = save,
                                }
                            }
                            char::from_u32(unit).unwrap_or('\u{fffd}')
                        }
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        other => other as char,
                    };
                    let mut buf = [0; 4];
                    push(&mut out, c.encode_utf8(&mut buf).as_bytes());
                }
                b => push(&mut out, &[b]),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.i..self.i + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        let unit = u32::from_str_radix(text, 16).ok()?;
        self.i += 4;
        Some(unit)
    }

    /// A value read as a scalar (a container is skipped).
    fn scalar(&mut self) -> Option<Scalar> {
        match self.peek()? {
            b'"' => self.string(usize::MAX).map(Scalar::Str),
            b'{' | b'[' => self.skip().map(|_| Scalar::Container),
            _ => self.bare().map(|b| Scalar::Bare(b.to_vec())),
        }
    }

    /// A number or literal (`true`, `null`, `NaN`, `-Infinity`…) as written.
    fn bare(&mut self) -> Option<&[u8]> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if matches!(
                c,
                b',' | b'}' | b']' | b':' | b'"' | b'{' | b'[' | b' ' | b'\t' | b'\n' | b'\r'
            ) {
                break;
            }
            self.i += 1;
        }
        (self.i > start)
            .then(|| self.b.get(start..self.i))
            .flatten()
    }

    /// Skips one value of any depth, without recursion.
    fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => self.skip_string()?,
                        b'{' | b'[' => {
                            depth += 1;
                            self.i += 1;
                        }
                        b'}' | b']' => {
                            depth -= 1;
                            self.i += 1;
                            if depth == 0 {
                                return Some(());
                            }
                        }
                        _ => self.i += 1,
                    }
                }
            }
            _ => self.bare().map(|_| ()),
        }
    }

    fn skip_string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => {
                    self.next()?;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(body: &str) -> BodyFacts {
        BodyFacts::parse(body.as_bytes()).unwrap_or_else(|| panic!("unreadable: {body}"))
    }

    #[test]
    fn the_facts_limiting_needs() {
        let f = facts(
            r#"{"model":"m","max_tokens":50,"stream":true,"messages":[{"a":[1,2,{"model":"x"}]}]}"#,
        );
        assert_eq!(f.model.as_deref(), Some("m"));
        assert_eq!(f.output_token_cap(Api::Other), Some(50));
        assert_eq!(f.stream, Some(true));
        // A cap of zero or less is no cap (Ollama reads -1 as "no limit").
        let odd = facts(r#"{"model":7,"max_tokens":-3,"stream":"maybe"}"#);
        assert_eq!((odd.model, odd.max_tokens, odd.stream), (None, None, None));
        assert_eq!(facts(r#"{"max_tokens":0}"#).max_tokens, None);
        assert_eq!(
            facts(r#"{"max_completion_tokens":9}"#).output_token_cap(Api::Other),
            Some(9)
        );
        assert_eq!(
            facts(r#"{"generationConfig":{"maxOutputTokens":"70","candidateCount":3}}"#)
                .output_token_cap(Api::Other),
            Some(70)
        );
        for unreadable in [
            "not json",
            "[1]",
            "",
            "{",
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            "{'a':1}",
        ] {
            assert_eq!(
                BodyFacts::parse(unreadable.as_bytes()),
                None,
                "{unreadable}"
            );
        }
    }

    /// What Python's `json` and pydantic accept, read as they read it.
    #[test]
    fn what_lenient_upstreams_accept_is_read() {
        let f = facts(
            "\u{feff}{\"model\":\"gpt-4o\",\"temperature\":NaN,\"top_p\":Infinity,\"x\":-Infinity,\
             \"user\":\"\\ud800\",\"max_tokens\":300,\"stream\":true}",
        );
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!((f.max_tokens, f.stream), (Some(300), Some(true)));
        // A repeated field: the last one.
        let f = facts(r#"{"model":"cheap","stream":false,"model":"dear","stream":"true"}"#);
        assert_eq!((f.model.as_deref(), f.stream), (Some("dear"), Some(true)));
        // Escapes in keys are keys.
        let f = facts(r#"{"mod\u0065l":"gpt-4o","max\u005ftokens":7}"#);
        assert_eq!(
            (f.model.as_deref(), f.max_tokens),
            (Some("gpt-4o"), Some(7))
        );
        // Lax booleans, caps as strings, NaN as no cap, Infinity as the largest.
        assert_eq!(facts(r#"{"stream":1}"#).stream, Some(true));
        for one in ["1.00", "1e0", "\"True\""] {
            let f = facts(&format!(r#"{{"stream":{one}}}"#));
            assert_eq!(f.stream, Some(true), "{one}");
        }
        assert_eq!(facts(r#"{"stream":"off"}"#).stream, Some(false));
        assert_eq!(
            facts(r#"{"max_tokens":NaN}"#).output_token_cap(Api::Other),
            None
        );
        assert_eq!(
            facts(r#"{"max_tokens":Infinity}"#).output_token_cap(Api::Other),
            Some(u64::MAX)
        );
        // A surrogate pair is one character; a lone one is U+FFFD.
        assert_eq!(
            facts(r#"{"model":"a\ud83d\ude00b\udc00"}"#)
                .model
                .as_deref(),
            Some("a😀b\u{fffd}")
        );
    }

    /// Go matches keys to fields whatever their case; Python does not. One field under two
    /// spellings reads differently to each: unreadable. Under one spelling it is the field.
    #[test]
    fn keys_are_read_as_case_insensitive_parsers_read_them() {
        let f = facts(r#"{"MODEL":"gpt-4o","Max_Tokens":7,"Stream":true}"#);
        assert_eq!(
            (f.model.as_deref(), f.max_tokens, f.stream),
            (Some("gpt-4o"), Some(7), Some(true))
        );
        let f = facts(r#"{"generation_config":{"max_output_tokens":9,"candidateCount":2}}"#);
        assert_eq!((f.generation_config, f.candidate_count), (Some(9), Some(2)));
        for conflicting in [
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
            r#"{"max_tokens":5,"MAX_TOKENS":5000}"#,
            r#"{"generationConfig":{},"generation_config":{}}"#,
            r#"{"stream_options":{"include_usage":false,"Include_Usage":true}}"#,
        ] {
            assert_eq!(
                BodyFacts::parse(conflicting.as_bytes()),
                None,
                "{conflicting}"
            );
        }
        // The same spelling twice is a repeated key (the last), not a conflict.
        assert_eq!(
            facts(r#"{"model":"a","model":"b"}"#).model.as_deref(),
            Some("b")
        );
    }

    /// A cap counts only in a field the endpoint reads: `max_output_tokens` caps nothing on
    /// chat completions.
    #[test]
    fn caps_count_in_the_fields_each_api_reads() {
        let f = facts(r#"{"max_output_tokens":1,"generationConfig":{"maxOutputTokens":1}}"#);
        assert_eq!(f.output_token_cap(Api::Chat), None);
        assert_eq!(f.output_token_cap(Api::Responses), Some(1));
        assert_eq!(f.output_token_cap(Api::Gemini), Some(1));
        let f = facts(r#"{"max_tokens":10,"max_completion_tokens":300}"#);
        assert_eq!(f.output_token_cap(Api::Chat), Some(300));
        assert_eq!(f.output_token_cap(Api::Messages), Some(10));
        // With `write_cap`, chat's own field is written beside the one it ignores.
        let body = r#"{"max_output_tokens":1}"#;
        let out = rewrite(
            body.as_bytes(),
            &facts(body),
            Edits {
                stream_usage: false,
                cap: Some((64, Api::Chat)),
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"max_completion_tokens":64,"max_output_tokens":1}"#
        );
    }

    #[test]
    fn choices_multiply_and_are_bounded() {
        assert_eq!(facts(r#"{"n":3}"#).choices(), 3);
        assert_eq!(facts(r#"{"n":2,"best_of":5}"#).choices(), 5);
        assert_eq!(
            facts(r#"{"generationConfig":{"candidateCount":4}}"#).choices(),
            4
        );
        assert_eq!(facts(r#"{"n":0}"#).choices(), 1);
        assert_eq!(facts(r#"{"n":1e9}"#).choices(), MAX_CHOICES);
        assert_eq!(facts(r#"{}"#).choices(), 1);
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let deep = format!(
            r#"{{"x":{}{}, "model": {}"m"{}, "max_tokens": 5}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000),
            "[".repeat(200),
            "]".repeat(200)
        );
        let f = facts(&deep);
        assert_eq!((f.model, f.max_tokens), (None, Some(5)));
    }

    fn edited(body: &str, edits: Edits) -> Option<String> {
        let f = facts(body);
        rewrite(body.as_bytes(), &f, edits).map(|b| String::from_utf8(b).unwrap())
    }

    fn read(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    const USAGE: Edits = Edits {
        stream_usage: true,
        cap: None,
    };

    #[test]
    fn usage_is_asked_for_in_the_last_occurrence() {
        assert_eq!(
            edited(" {\"model\":\"m\",\"stream\":true}", USAGE).as_deref(),
            Some(r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#)
        );
        for body in [
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"stream":true,"stream_options":{}}"#,
            r#"{"stream":true,"stream_options":{"x":1}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":null}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":0}}"#,
            r#"{"stream":false,"stream":true}"#,
        ] {
            let out = edited(body, USAGE).unwrap_or_else(|| panic!("unchanged: {body}"));
            // serde_json takes the last of a repeated key, as the upstreams do.
            let v = read(&out);
            assert_eq!(v["stream_options"]["include_usage"], true, "{body} → {out}");
        }
        // Other options are kept; no key is repeated where there was none.
        let out = edited(
            r#"{"stream":true,"stream_options":{"x":1,"include_usage":false}}"#,
            USAGE,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"stream":true,"stream_options":{"x":1,"include_usage":true}}"#
        );
        for unchanged in [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":"yes"}}"#,
            r#"{"stream":false}"#,
            r#"{"model":"m"}"#,
        ] {
            assert_eq!(edited(unchanged, USAGE), None, "{unchanged}");
        }
    }

    #[test]
    fn the_cap_is_written_where_each_api_reads_it() {
        let cap = |n, api| Edits {
            stream_usage: false,
            cap: Some((n, api)),
        };
        for (body, api, field) in [
            (r#"{"model":"m"}"#, Api::Chat, "/max_completion_tokens"),
            (r#"{"model":"m"}"#, Api::Completions, "/max_tokens"),
            (r#"{"model":"m"}"#, Api::Messages, "/max_tokens"),
            (r#"{"model":"m"}"#, Api::Responses, "/max_output_tokens"),
            (
                r#"{"contents":[]}"#,
                Api::Gemini,
                "/generationConfig/maxOutputTokens",
            ),
            (
                r#"{"generationConfig":{"temperature":1}}"#,
                Api::Gemini,
                "/generationConfig/maxOutputTokens",
            ),
            (
                r#"{"generationConfig":{}}"#,
                Api::Gemini,
                "/generationConfig/maxOutputTokens",
            ),
            // An earlier `generationConfig`'s cap is not the request's: the last one gets it.
            (
                r#"{"generationConfig":{"maxOutputTokens":8},"generationConfig":{}}"#,
                Api::Gemini,
                "/generationConfig/maxOutputTokens",
            ),
            (r#"{}"#, Api::Messages, "/max_tokens"),
        ] {
            let out = edited(body, cap(300, api)).unwrap();
            assert_eq!(
                read(&out).pointer(field),
                Some(&serde_json::json!(300)),
                "{out}"
            );
        }
        // A stated cap above the reservation is lowered, every occurrence; one below is kept.
        let out = edited(
            r#"{"max_tokens":5000,"max_completion_tokens":"lots","max_tokens":9000}"#,
            cap(300, Api::Chat),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"max_tokens":300,"max_completion_tokens":300,"max_tokens":300}"#
        );
        assert_eq!(edited(r#"{"max_tokens":100}"#, cap(300, Api::Chat)), None);
        assert_eq!(edited(r#"{"model":"m"}"#, cap(300, Api::Other)), None);
        // Both edits at once.
        let out = edited(
            r#"{"model":"m","stream":true}"#,
            Edits {
                stream_usage: true,
                cap: Some((64, Api::Chat)),
            },
        )
        .unwrap();
        let v = read(&out);
        assert_eq!(
            (
                v["stream_options"]["include_usage"].clone(),
                v["max_completion_tokens"].clone()
            ),
            (serde_json::json!(true), serde_json::json!(64))
        );
    }

    #[test]
    fn apis_by_path() {
        assert_eq!(Api::of("/v1/chat/completions"), Api::Chat);
        assert_eq!(Api::of("/v1/completions"), Api::Completions);
        assert_eq!(Api::of("/v1/messages"), Api::Messages);
        assert_eq!(Api::of("/v1/responses"), Api::Responses);
        assert_eq!(
            Api::of("/v1beta/models/gemini-2.5-pro:streamGenerateContent"),
            Api::Gemini
        );
        assert_eq!(Api::of("/v1/embeddings"), Api::Other);
    }

    /// Gemini and Vertex AI name the model in the path; other APIs do not.
    #[test]
    fn gemini_paths_name_their_model() {
        for (path, want) in [
            ("/v1beta/models/gemini-2.5-flash:generateContent", Some("gemini-2.5-flash")),
            (
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
                Some("gemini-2.5-pro"),
            ),
            ("/v1beta/models/:generateContent", None),
            ("/v1/chat/completions", None),
            ("/v1beta/models/gemini-2.5-flash:countTokens", None),
            (
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
                Some("claude-sonnet-4-5@20250929"),
            ),
            ("/v1beta/tunedModels/x:generateContent", None),
            ("\0/v1beta/models/gemini\\xff:generateContent", None),
        ] {
            assert_eq!(path_model(path), want, "{path}");
        }
    }
}
