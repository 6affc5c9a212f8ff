//! A byte-level Server-Sent Events parser (the WHATWG event-stream grammar) that streams each
//! event's `data` straight into a [`JsonScanner`] instead of collecting it.
//!
//! LF, CRLF and CR line ends, a CRLF split across chunks, multi-line `data` (joined by a newline,
//! which JSON reads as whitespace), `event:`/`id:`/`retry:` fields, `:` comments and a leading
//! BOM are handled. Nothing of an event is buffered, so one event costs the same constant memory
//! whatever its size: a multi-megabyte event is scanned as it passes.

use super::json::JsonScanner;

/// The longest field name the parser distinguishes (`event`, `data`, `retry`); longer names are
/// unknown fields and ignored.
const FIELD_NAME: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the field name at the start of a line.
    Name,
    /// Just after the colon: one space is skipped.
    Colon(Field),
    Value(Field),
    /// A comment line, or the rest of an unknown field.
    Skip,
}

/// See the module documentation.
#[derive(Clone)]
pub struct SseParser {
    phase: Phase,
    name: [u8; FIELD_NAME],
    name_len: usize,
    /// The previous byte was a CR: a following LF belongs to the same line end.
    after_cr: bool,
    /// How many bytes of a leading UTF-8 BOM were skipped; `None` once past the start.
    bom: Option<usize>,
    /// The current event has a data line (the next one is joined with a newline).
    event_has_data: bool,
    /// Events dispatched so far.
    pub events: u64,
    pub json: JsonScanner,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser {
            phase: Phase::Name,
            name: [0; FIELD_NAME],
            name_len: 0,
            after_cr: false,
            bom: Some(0),
            event_has_data: false,
            events: 0,
            json: JsonScanner::default(),
        }
    }
}

impl SseParser {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        if let Some(seen) = self.bom {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            let mut n = seen;
            while let (Some(&b), Some(&want)) = (chunk.first(), BOM.get(n)) {
                if b != want {
                    break;
                }
                n += 1;
                chunk = chunk.get(1..).unwrap_or_default();
            }
            self.bom = (n < BOM.len() && chunk.is_empty()).then_some(n);
        }
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            // Data bytes are handed to the JSON scanner in runs, not one by one.
            if self.phase == Phase::Value(Field::Data) && b != b'\r' && b != b'\n' {
                continue;
            }
            if let Some(run) = chunk.get(start..i) {
                if self.phase == Phase::Value(Field::Data) {
                    self.json.feed(run);
                }
            }
            start = i + 1;
            self.byte(b);
        }
        if self.phase == Phase::Value(Field::Data) {
            if let Some(run) = chunk.get(start..) {
                self.json.feed(run);
            }
        }
    }

    /// Ends the stream: an event without its closing blank line is not dispatched (as the
    /// standard says), but the usage it carried has been seen and is kept.
    pub fn finish(&mut self) {
        self.json.next_document();
    }

    fn byte(&mut self, b: u8) {
        let after_cr = std::mem::take(&mut self.after_cr);
        match b {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                self.after_cr = b == b'\r';
                self.end_line();
            }
            _ => match self.phase {
                Phase::Name if b == b':' => {
                    self.phase = if self.name_len == 0 {
                        Phase::Skip
                    } else {
                        Phase::Colon(self.field())
                    };
                }
                Phase::Name => {
                    if let Some(slot) = self.name.get_mut(self.name_len) {
                        *slot = b;
                    }
                    self.name_len = self.name_len.saturating_add(1);
                }
                Phase::Colon(field) => {
                    self.start_value(field);
                    if b != b' ' {
                        self.byte(b);
                    }
                }
                Phase::Value(Field::Data) => self.json.feed(&[b]),
                // Only `data` is needed.
                Phase::Value(Field::Other) | Phase::Skip => {}
            },
        }
    }

    fn field(&self) -> Field {
        match self.name.get(..self.name_len) {
            Some(b"data") => Field::Data,
            _ => Field::Other,
        }
    }

    fn start_value(&mut self, field: Field) {
        if field == Field::Data {
            if self.event_has_data {
                self.json.feed(b"\n");
            }
            self.event_has_data = true;
        }
        self.phase = Phase::Value(field);
    }

    fn end_line(&mut self) {
        match self.phase {
            Phase::Name if self.name_len == 0 => self.dispatch(),
            // A line without a colon is a field with an empty value.
            Phase::Name => {
                let field = self.field();
                self.start_value(field);
            }
            Phase::Colon(field) => self.start_value(field),
            Phase::Value(_) | Phase::Skip => {}
        }
        self.phase = Phase::Name;
        self.name_len = 0;
    }

    fn dispatch(&mut self) {
        if self.event_has_data {
            self.events += 1;
            self.json.next_document();
        }
        self.event_has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> SseParser {
        let mut p = SseParser::default();
        for c in chunks {
            p.feed(c);
        }
        p.finish();
        p
    }

    #[test]
    fn line_ends_and_fields() {
        for nl in ["\n", "\r\n", "\r"] {
            let text = [
                "\u{feff}: keep-alive",
                "event: message_start",
                "id: 1",
                "retry: 10",
                r#"data: {"usage":"#,
                r#"data:{"prompt_tokens":3}}"#,
                "",
                "data",
                "",
                r#"data: {"usage": {"completion_tokens": 4}}"#,
                "",
                "data: [DONE]",
                "",
                "",
            ]
            .join(nl);
            let p = parse(&[text.as_bytes()]);
            assert_eq!(p.events, 4, "{nl:?}");
            assert_eq!(p.json.fields.prompt, Some(3), "{nl:?}");
            assert_eq!(p.json.fields.completion, Some(4), "{nl:?}");
        }
    }

    #[test]
    fn event_fields_do_not_reach_the_scanner() {
        let p = parse(&[b"event: {\"usage\":{\"total_tokens\":5}}\nid: {\n\ndata: {\"usage\":{\"total_tokens\":2}}\n\n"]);
        assert_eq!(p.json.fields.total, Some(2));
    }

    #[test]
    fn a_broken_event_does_not_spoil_the_next() {
        let p = parse(&[
            b"data: {\"usage\":{\"a\":[{\"x\n\ndata: {\"usage\":{\"total_tokens\":6}}\n\n",
        ]);
        assert_eq!(p.json.fields.total, Some(6));
    }

    #[test]
    fn crlf_split_across_chunks() {
        let p = parse(&[
            b"data: {\"usage\":{\"total_tokens\":1}}\r",
            b"\n\r",
            b"\ndata: {\"usage\":{\"total_tokens\":2}}\r\n\r\n",
        ]);
        assert_eq!((p.events, p.json.fields.total), (2, Some(2)));
    }
}
