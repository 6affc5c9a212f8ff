//! What the plugin added to a stream for its own accounting, taken out of what the client
//! receives.
//!
//! When the plugin rewrote a streaming request to ask for usage (`stream_options.include_usage`),
//! the upstream sends two things the client never asked for: a final chunk with `"choices": []`
//! and the usage, and `"usage": null` in every other chunk. Some clients index `choices[0]` and
//! fail on the first. The stripper passes the event stream through event by event, drops the
//! usage-only event and removes a top-level `"usage": null`, leaving every other byte as the
//! upstream sent it. It holds at most one event, and no more than [`MAX_EVENT`] bytes of it: a
//! larger event (generated text, never the small usage chunk) streams through as it is.

/// The most bytes of one event held back to decide what to do with it.
pub const MAX_EVENT: usize = 64 * 1024;

/// Finds where events end in an event stream (a blank line: LF LF, CR LF CR LF or CR CR), one
/// byte at a time, across chunks.
#[derive(Debug, Clone, Copy)]
pub struct EventEnds {
    /// At the start of a line (an empty line ends the event).
    line_start: bool,
    /// The last byte was `\r` (a following `\n` belongs to the same line end).
    after_cr: bool,
}

impl Default for EventEnds {
    fn default() -> Self {
        EventEnds {
            line_start: true,
            after_cr: false,
        }
    }
}

impl EventEnds {
    /// Whether `b` ends an event.
    pub fn ends_event(&mut self, b: u8) -> bool {
        let ends_line = match b {
            b'\r' => true,
            b'\n' => !std::mem::take(&mut self.after_cr),
            _ => false,
        };
        self.after_cr = b == b'\r';
        let ends_event = ends_line && self.line_start;
        if ends_line {
            self.line_start = true;
        } else if b != b'\n' {
            self.line_start = false;
        }
        ends_event
    }
}

#[derive(Debug, Default)]
pub struct Stripper {
    /// The current event's bytes, while it may still be one to change.
    event: Vec<u8>,
    /// The current event outgrew [`MAX_EVENT`]: the rest of it passes through.
    passing: bool,
    ends: EventEnds,
    /// Events dropped, `"usage": null` fields removed (for the tests and the logs).
    pub dropped: u64,
    pub removed: u64,
}

impl Stripper {
    pub fn new() -> Stripper {
        Stripper::default()
    }

    /// Feeds a chunk; what the client receives for it is appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut from = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if self.ends.ends_event(b) {
                let (head, _) = chunk.split_at(i + 1);
                self.take(&head[from..], out);
                from = i + 1;
                self.end_event(out);
            }
        }
        self.take(&chunk[from..], out);
    }

    /// The stream ended: what is held goes out as it is (an unterminated event is not one the
    /// upstream finished).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.event);
        self.passing = false;
    }

    fn take(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.passing {
            out.extend_from_slice(bytes);
        } else if self.event.len() + bytes.len() > MAX_EVENT {
            out.append(&mut self.event);
            out.extend_from_slice(bytes);
            self.passing = true;
        } else {
            self.event.extend_from_slice(bytes);
        }
    }

    fn end_event(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.passing) {
            return;
        }
        let event = std::mem::take(&mut self.event);
        match rewrite(&event) {
            Rewrite::Drop => self.dropped += 1,
            Rewrite::Keep => out.extend_from_slice(&event),
            Rewrite::Replace(bytes) => {
                self.removed += 1;
                out.extend_from_slice(&bytes);
            }
        }
    }
}

enum Rewrite {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

/// What becomes of one complete event (its bytes, terminator included).
fn rewrite(event: &[u8]) -> Rewrite {
    let Some((start, end)) = data_span(event) else {
        return Rewrite::Keep;
    };
    let data = &event[start..end];
    let Ok(serde_json::Value::Object(chunk)) = serde_json::from_slice(data) else {
        return Rewrite::Keep;
    };
    let no_choices = chunk
        .get("choices")
        .is_some_and(|c| c.as_array().is_some_and(Vec::is_empty));
    if no_choices && chunk.get("usage").is_some_and(|u| u.is_object()) {
        return Rewrite::Drop;
    }
    if chunk.get("usage").is_some_and(|u| u.is_null()) {
        if let Some(json) = without_null_usage(data) {
            return Rewrite::Replace([&event[..start], &json, &event[end..]].concat());
        }
    }
    Rewrite::Keep
}

/// The bytes of the event's one `data:` field's value (after `data:` and one space, before the
/// line end); `None` for an event with no data line or several.
fn data_span(event: &[u8]) -> Option<(usize, usize)> {
    let mut span = None;
    let mut pos = 0;
    for line in event.split_inclusive(|b| *b == b'\n' || *b == b'\r') {
        let body = line
            .strip_suffix(b"\n")
            .or_else(|| line.strip_suffix(b"\r"))
            .unwrap_or(line);
        if let Some(value) = body.strip_prefix(b"data:") {
            if span.is_some() {
                return None;
            }
            let skip = usize::from(value.first() == Some(&b' '));
            span = Some((pos + 5 + skip, pos + body.len()));
        }
        pos += line.len();
    }
    span
}

/// `json` (an object) without its top-level `"usage": null` member, the comma before it (or
/// after it, when it comes first) included; `None` when there is none.
fn without_null_usage(json: &[u8]) -> Option<Vec<u8>> {
    // Walk the top level: for each member, where it starts (its key), where its value ends.
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    let mut members: Vec<(usize, usize, usize)> = Vec::new(); // (comma or brace, key start, value end)
    let mut separator = 0;
    let mut key_start = None;
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => {
                if depth == 1 && key_start.is_none() {
                    key_start = Some(i);
                }
                in_string = true;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    separator = i;
                }
            }
            b'}' | b']' => {
                if depth == 1 {
                    if let Some(k) = key_start.take() {
                        members.push((separator, k, i));
                    }
                }
                depth = depth.saturating_sub(1);
            }
            b',' if depth == 1 => {
                if let Some(k) = key_start.take() {
                    members.push((separator, k, i));
                }
                separator = i;
            }
            _ => {}
        }
    }
    let (index, &(sep, _, end)) = members.iter().enumerate().find(|(_, (_, key, end))| {
        let member = &json[*key..*end];
        let Some(colon) = member.iter().position(|b| *b == b':') else {
            return false;
        };
        member[..colon].trim_ascii() == b"\"usage\"" && member[colon + 1..].trim_ascii() == b"null"
    })?;
    Some(if index == 0 {
        // First member: drop it and the comma after it (or nothing, when it is alone).
        let next = members.get(1).map_or(end, |m| m.0 + 1);
        [&json[..sep + 1], &json[next..]].concat()
    } else {
        [&json[..sep], &json[end..]].concat()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        ": keep-alive\n\n",
        "data: {\"usage\": null, \"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": null\"}}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    );

    const WANT: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        ": keep-alive\n\n",
        "data: { \"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": null\"}}]}\n\n",
        "data: [DONE]\n\n",
    );

    fn strip(chunks: &[&[u8]]) -> String {
        let mut s = Stripper::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_the_client_did_not_ask_for_is_taken_out_at_every_split() {
        let body = STREAM.as_bytes();
        assert_eq!(strip(&[body]), WANT);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(strip(&[a, b]), WANT, "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(strip(&bytes), WANT, "byte by byte");
    }

    #[test]
    fn other_streams_pass_as_they_are() {
        for body in [
            // CRLF line ends, an event without data, Anthropic's events, invalid JSON.
            "data: {\"a\":1}\r\n\r\nevent: ping\r\n\r\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\n",
            "data: {not json\n\n",
            // Unterminated at the end: sent as it is.
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":1}}",
        ] {
            assert_eq!(strip(&[body.as_bytes()]), body, "{body}");
        }
    }

    #[test]
    fn a_large_event_streams_through_without_being_held() {
        let text = "x".repeat(3 * MAX_EVENT);
        let event = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
        );
        let mut s = Stripper::new();
        let mut out = Vec::new();
        for c in event.as_bytes().chunks(1000) {
            s.feed(c, &mut out);
            assert!(s.event.len() <= MAX_EVENT);
        }
        s.finish(&mut out);
        assert_eq!(
            out,
            event.as_bytes(),
            "too large to be the usage chunk: untouched"
        );
    }

    #[test]
    fn null_usage_is_removed_wherever_it_stands() {
        let cases = [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1, "usage" : null ,"b":2}"#, r#"{"a":1,"b":2}"#),
            (r#"{"usage":null}"#, r#"{}"#),
        ];
        for (json, want) in cases {
            let got = without_null_usage(json.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), want, "{json}");
        }
        assert!(without_null_usage(br#"{"a":{"usage":null}}"#).is_none());
        assert!(without_null_usage(br#"{"usage":{"x":1}}"#).is_none());
    }
}
