//! One response body's usage scan: picks JSON or SSE from the content itself and feeds every
//! chunk through. Content, not `content-type`, decides: servers label streams wrongly (SSE as
//! `application/json` or `text/plain`), but a JSON body always starts with `{` or `[` and an
//! event stream never does.

use super::fields::{Observed, UsageFields};
use super::json::JsonScanner;
use super::sse::SseParser;

/// How a response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// Not decided yet: no content seen.
    Unknown,
    /// One JSON document, a JSON array of them (Gemini without `alt=sse`) or JSON lines.
    Json,
    Sse,
    /// Compressed: only its size can be counted.
    Opaque,
}

enum Mode {
    Undecided,
    Json(JsonScanner),
    Sse(SseParser),
    Opaque,
}

/// Whether a body with this `content-encoding` is compressed (`identity` and an empty value
/// are not).
pub fn is_encoded(content_encoding: Option<&str>) -> bool {
    content_encoding.is_some_and(|e| {
        let e = e.trim();
        !e.is_empty() && !e.eq_ignore_ascii_case("identity")
    })
}

/// See the module documentation.
pub struct UsageScanner {
    mode: Mode,
    body_bytes: u64,
}

impl UsageScanner {
    /// A scanner for a response with this `content-encoding`.
    pub fn new(content_encoding: Option<&str>) -> UsageScanner {
        let mode = if is_encoded(content_encoding) {
            Mode::Opaque
        } else {
            Mode::Undecided
        };
        UsageScanner {
            mode,
            body_bytes: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.body_bytes = self.body_bytes.saturating_add(chunk.len() as u64);
        if let Mode::Undecided = self.mode {
            // Leading whitespace means nothing in either format.
            let Some(&first) = chunk.iter().find(|b| !b.is_ascii_whitespace()) else {
                return;
            };
            self.mode = if first == b'{' || first == b'[' {
                Mode::Json(JsonScanner::default())
            } else {
                Mode::Sse(SseParser::default())
            };
        }
        match &mut self.mode {
            Mode::Json(json) => json.feed(chunk),
            Mode::Sse(sse) => sse.feed(chunk),
            Mode::Undecided | Mode::Opaque => {}
        }
    }

    /// Ends the body: a last number without a delimiter after it is taken into account.
    pub fn finish(&mut self) {
        match &mut self.mode {
            Mode::Json(json) => json.next_document(),
            Mode::Sse(sse) => sse.finish(),
            Mode::Undecided | Mode::Opaque => {}
        }
    }

    pub fn format(&self) -> BodyFormat {
        match self.mode {
            Mode::Undecided => BodyFormat::Unknown,
            Mode::Json(_) => BodyFormat::Json,
            Mode::Sse(_) => BodyFormat::Sse,
            Mode::Opaque => BodyFormat::Opaque,
        }
    }

    fn json(&self) -> Option<&JsonScanner> {
        match &self.mode {
            Mode::Json(json) => Some(json),
            Mode::Sse(sse) => Some(&sse.json),
            Mode::Undecided | Mode::Opaque => None,
        }
    }

    pub fn fields(&self) -> UsageFields {
        self.json().map(|j| j.fields).unwrap_or_default()
    }

    /// The model the response names, if it names one.
    pub fn model(&self) -> Option<&str> {
        self.json().and_then(JsonScanner::model)
    }

    /// The response's id, if it names one.
    pub fn response_id(&self) -> Option<&str> {
        self.json().and_then(JsonScanner::response_id)
    }

    /// The service tier the response names, if it names one.
    pub fn service_tier(&self) -> Option<&str> {
        self.json().and_then(JsonScanner::service_tier)
    }

    pub fn text_bytes(&self) -> u64 {
        self.json().map_or(0, |j| j.text_bytes)
    }

    /// Server-sent events seen whole so far.
    pub fn events(&self) -> u64 {
        match &self.mode {
            Mode::Sse(sse) => sse.events,
            _ => 0,
        }
    }

    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// What this scan saw of a response with `status`, for [`super::settle`].
    pub fn observed(&self, status: u32, complete: bool, request_bytes: Option<u64>) -> Observed {
        Observed {
            status: Some(status),
            fields: self.fields(),
            text_bytes: self.text_bytes(),
            body_bytes: self.body_bytes,
            opaque: self.format() == BodyFormat::Opaque,
            complete,
            request_bytes,
        }
    }
}
