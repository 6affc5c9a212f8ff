//! A mock LLM upstream: answers in the shape of the API the request's path names, with the
//! usage, text size and streaming the request asks for, so tests can know exactly what a
//! client should be charged.
//!
//! The provider comes from the path (`…/chat/completions`, `…/completions`, `…/embeddings`,
//! `…/responses`, `…/messages`, `…:generateContent`, `…:streamGenerateContent`, `…/generation`),
//! streaming from the body (`"stream": true`, DashScope's `X-DashScope-SSE: enable`, Gemini's
//! `alt=sse`). Like the real APIs, an OpenAI chat stream carries usage only when the request
//! says `stream_options.include_usage`. Request headers steer the rest:
//!
//! | header | default | meaning |
//! |---|---|---|
//! | `x-mock-prompt-tokens` | 10 | prompt tokens reported |
//! | `x-mock-completion-tokens` | 16 | completion tokens reported |
//! | `x-mock-cache-read-tokens` | 0 | of the prompt, reported as Anthropic cache reads |
//! | `x-mock-text-bytes` | 4 × completion | bytes of generated text |
//! | `x-mock-piece-bytes` | 16 | text bytes per streamed event |
//! | `x-mock-no-usage` | – | leave usage out entirely |
//! | `x-mock-status` | 200 | answer this status with an error body instead |
//! | `x-mock-chunk-bytes` | – | write the body in pieces of exactly this size |
//! | `x-mock-delay-ms` | 0 | pause between events |
//! | `x-mock-latency-ms` | 0 | pause before answering |
//! | `x-mock-ignore-cap` | – | generate past the request's output cap, as a misconfigured upstream does |
//!
//! Like the real engines, the mock honours the request's output cap (`max_tokens`,
//! `max_completion_tokens`, `max_output_tokens`, `generationConfig.maxOutputTokens`): an answer
//! that would be longer is cut to the cap (text at 4 bytes a token) and ends with the API's
//! own reason (`length`, `max_tokens`, `incomplete`, `MAX_TOKENS`).

use serde_json::{json, Value};

/// The API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Anthropic,
    Gemini,
    DashScope,
}

impl Provider {
    pub fn from_path(path: &str) -> Option<Provider> {
        let path = path.split('?').next().unwrap_or(path);
        Some(if path.ends_with("/chat/completions") {
            Provider::Chat
        } else if path.ends_with("/completions") {
            Provider::Completions
        } else if path.ends_with("/embeddings") {
            Provider::Embeddings
        } else if path.ends_with("/responses") {
            Provider::Responses
        } else if path.ends_with("/messages") {
            Provider::Anthropic
        } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
            Provider::Gemini
        } else if path.ends_with("/generation") {
            Provider::DashScope
        } else {
            return None;
        })
    }
}

/// What one request asked for.
#[derive(Debug, Clone)]
pub struct Ask {
    pub provider: Provider,
    pub stream: bool,
    /// Gemini streaming without `alt=sse`: a JSON array.
    pub json_array: bool,
    /// An OpenAI chat/completions stream with `stream_options.include_usage`.
    pub include_usage: bool,
    pub usage: bool,
    pub prompt: u64,
    pub completion: u64,
    pub cache_read: u64,
    pub text_bytes: u64,
    pub piece_bytes: u64,
    pub model: String,
    /// The answer was cut to the request's output cap.
    pub capped: bool,
}

impl Ask {
    /// Reads a request; `header` looks a request header up (lower-case name).
    pub fn read(path: &str, body: &[u8], header: impl Fn(&str) -> Option<String>) -> Option<Ask> {
        let provider = Provider::from_path(path)?;
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let num = |name: &str, default: u64| {
            header(name)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        let wanted = num("x-mock-completion-tokens", 16);
        let cap = [
            &body["max_tokens"],
            &body["max_completion_tokens"],
            &body["max_output_tokens"],
            &body["generationConfig"]["maxOutputTokens"],
        ]
        .into_iter()
        .find_map(Value::as_u64)
        .filter(|_| header("x-mock-ignore-cap").is_none());
        let completion = cap.map_or(wanted, |c| wanted.min(c));
        let capped = completion < wanted;
        let text_bytes = num("x-mock-text-bytes", wanted * 4);
        let text_bytes = if capped {
            text_bytes.min(completion * 4)
        } else {
            text_bytes
        };
        let query_sse = path.contains("alt=sse");
        let stream = match provider {
            Provider::Gemini => path
                .split('?')
                .next()
                .unwrap_or("")
                .ends_with(":streamGenerateContent"),
            Provider::DashScope => {
                header("x-dashscope-sse").is_some_and(|v| v.eq_ignore_ascii_case("enable"))
            }
            Provider::Embeddings => false,
            _ => body["stream"] == true,
        };
        Some(Ask {
            provider,
            stream,
            json_array: provider == Provider::Gemini && stream && !query_sse,
            include_usage: body["stream_options"]["include_usage"] == true,
            usage: header("x-mock-no-usage").is_none(),
            prompt: num("x-mock-prompt-tokens", 10),
            completion,
            cache_read: num("x-mock-cache-read-tokens", 0),
            text_bytes,
            piece_bytes: num("x-mock-piece-bytes", 16).max(1),
            model: body["model"].as_str().unwrap_or("mock-1").to_string(),
            capped,
        })
    }

    pub fn content_type(&self) -> &'static str {
        if self.stream && !self.json_array {
            "text/event-stream"
        } else {
            "application/json"
        }
    }

    /// The body, as the pieces a server would write (one per event when streaming). Lazy, so
    /// a 100 MB answer never sits in memory.
    pub fn body(self) -> Box<dyn Iterator<Item = String> + Send> {
        if !self.stream {
            return Box::new(std::iter::once(self.whole()));
        }
        let pieces = self.pieces();
        let (head, tail) = self.stream_frames();
        Box::new(
            head.into_iter()
                .chain(pieces.enumerate().map({
                    let ask = self.clone();
                    move |(i, text)| ask.delta(i as u64, &text)
                }))
                .chain(tail),
        )
    }

    /// The generated text, `piece_bytes` at a time.
    fn pieces(&self) -> impl Iterator<Item = String> + Send {
        let (total, piece) = (self.text_bytes, self.piece_bytes);
        let count = total.div_ceil(piece);
        (0..count).map(move |i| text(piece.min(total - i * piece)))
    }

    /// The reason the answer ended, in the API's words: `done` for a whole answer.
    fn reason<'a>(&self, done: &'a str, capped: &'a str) -> &'a str {
        if self.capped {
            capped
        } else {
            done
        }
    }

    fn usage_openai(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.prompt + self.completion,
               "prompt_tokens_details": {"cached_tokens": self.cache_read}})
    }

    fn usage_input_output(&self) -> Value {
        json!({"input_tokens": self.prompt, "output_tokens": self.completion,
               "total_tokens": self.prompt + self.completion})
    }

    fn usage_gemini(&self, completion: u64) -> Value {
        json!({"promptTokenCount": self.prompt, "candidatesTokenCount": completion,
               "totalTokenCount": self.prompt + completion})
    }

    fn whole(&self) -> String {
        let t = text(self.text_bytes);
        let mut v = match self.provider {
            Provider::Chat => {
                json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": t}, "finish_reason": self.reason("stop", "length")}],
                "usage": self.usage_openai()})
            }
            Provider::Completions => {
                json!({"id": "cmpl-mock", "object": "text_completion", "created": 1, "model": self.model,
                "choices": [{"index": 0, "text": t, "finish_reason": self.reason("stop", "length")}], "usage": self.usage_openai()})
            }
            Provider::Embeddings => json!({"object": "list", "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093, 0.0151]}],
                "usage": {"prompt_tokens": self.prompt, "total_tokens": self.prompt}}),
            Provider::Responses => {
                json!({"id": "resp_mock", "object": "response", "status": self.reason("completed", "incomplete"), "model": self.model,
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": t}]}],
                "usage": self.usage_input_output()})
            }
            Provider::Anthropic => {
                json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": t}], "stop_reason": self.reason("end_turn", "max_tokens"),
                "usage": {"input_tokens": self.prompt - self.cache_read.min(self.prompt),
                          "cache_read_input_tokens": self.cache_read.min(self.prompt),
                          "cache_creation_input_tokens": 0, "output_tokens": self.completion}})
            }
            Provider::Gemini => {
                json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "finishReason": self.reason("STOP", "MAX_TOKENS")}],
                "usageMetadata": self.usage_gemini(self.completion), "modelVersion": self.model})
            }
            Provider::DashScope => {
                json!({"output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": t}}]},
                "usage": self.usage_input_output(), "request_id": "mock"})
            }
        };
        if !self.usage {
            strip_usage(&mut v);
        }
        v.to_string()
    }

    /// The events before and after the text deltas.
    fn stream_frames(&self) -> (Vec<String>, Vec<String>) {
        let usage = self.usage;
        match self.provider {
            Provider::Chat | Provider::Completions => {
                let null_usage = if self.include_usage {
                    ",\"usage\":null"
                } else {
                    ""
                };
                let finish = format!(
                    r#"{{"id":"chatcmpl-mock","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{}},"finish_reason":"{}"}}]{null_usage}}}"#,
                    self.reason("stop", "length")
                );
                let mut tail = vec![sse(None, &finish)];
                if self.include_usage && usage {
                    let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": self.usage_openai()});
                    tail.push(sse(None, &u.to_string()));
                }
                tail.push(sse(None, "[DONE]"));
                (Vec::new(), tail)
            }
            Provider::Responses => {
                let created = json!({"type": "response.created", "response": {"id": "resp_mock", "status": "in_progress", "usage": null}});
                let end = self.reason("response.completed", "response.incomplete");
                let mut done = json!({"type": end, "response": {"id": "resp_mock", "status": self.reason("completed", "incomplete"),
                    "output": [], "usage": self.usage_input_output()}});
                if !usage {
                    strip_usage(&mut done);
                }
                // The output item and its text part open before the deltas, as OpenAI sends
                // them (the SDK's stream helper needs both).
                let item = json!({"type": "response.output_item.added", "output_index": 0,
                    "item": {"id": "msg_mock", "type": "message", "role": "assistant", "status": "in_progress", "content": []}});
                let part = json!({"type": "response.content_part.added", "item_id": "msg_mock", "output_index": 0,
                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}});
                (
                    vec![
                        sse(Some("response.created"), &created.to_string()),
                        sse(Some("response.output_item.added"), &item.to_string()),
                        sse(Some("response.content_part.added"), &part.to_string()),
                    ],
                    vec![sse(Some(end), &done.to_string())],
                )
            }
            Provider::Anthropic => {
                let cache = self.cache_read.min(self.prompt);
                let mut start = json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
                    "content": [], "model": self.model, "usage": {"input_tokens": self.prompt - cache,
                    "cache_read_input_tokens": cache, "cache_creation_input_tokens": 0, "output_tokens": 1}}});
                let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": self.reason("end_turn", "max_tokens")}, "usage": {"output_tokens": self.completion}});
                if !usage {
                    strip_usage(&mut start);
                    strip_usage(&mut delta);
                }
                (
                    vec![
                        sse(Some("message_start"), &start.to_string()),
                        sse(
                            Some("content_block_start"),
                            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                        ),
                        sse(Some("ping"), r#"{"type": "ping"}"#),
                    ],
                    vec![
                        sse(
                            Some("content_block_stop"),
                            r#"{"type":"content_block_stop","index":0}"#,
                        ),
                        sse(Some("message_delta"), &delta.to_string()),
                        sse(Some("message_stop"), r#"{"type":"message_stop"}"#),
                    ],
                )
            }
            Provider::Gemini => {
                let mut last = json!({"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": self.reason("STOP", "MAX_TOKENS")}],
                    "usageMetadata": self.usage_gemini(self.completion)});
                if !usage {
                    strip_usage(&mut last);
                }
                if self.json_array {
                    (vec!["[".into()], vec![format!(",\r\n{last}]")])
                } else {
                    (Vec::new(), vec![format!("data: {last}\r\n\r\n")])
                }
            }
            Provider::DashScope | Provider::Embeddings => (Vec::new(), Vec::new()),
        }
    }

    /// The `i`-th text delta event.
    fn delta(&self, i: u64, piece: &str) -> String {
        let pieces = self.text_bytes.div_ceil(self.piece_bytes).max(1);
        // Providers that repeat cumulative usage in every event.
        let so_far = self.completion * (i + 1) / pieces;
        match self.provider {
            Provider::Chat => {
                let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": self.model,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
                if self.include_usage {
                    v["usage"] = Value::Null;
                }
                sse(None, &v.to_string())
            }
            Provider::Completions => sse(
                None,
                &json!({"id": "cmpl-mock", "object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": null}]})
                    .to_string(),
            ),
            Provider::Responses => sse(
                Some("response.output_text.delta"),
                &json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": piece}).to_string(),
            ),
            Provider::Anthropic => sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}).to_string(),
            ),
            Provider::Gemini => {
                let mut v = json!({"candidates": [{"content": {"parts": [{"text": piece}], "role": "model"}}],
                    "usageMetadata": self.usage_gemini(so_far)});
                if !self.usage {
                    strip_usage(&mut v);
                }
                if self.json_array {
                    let sep = if i == 0 { "" } else { ",\r\n" };
                    format!("{sep}{v}")
                } else {
                    format!("data: {v}\r\n\r\n")
                }
            }
            Provider::DashScope => {
                let mut v = json!({"output": {"choices": [{"message": {"role": "assistant", "content": piece},
                    "finish_reason": if i + 1 == pieces { "stop" } else { "null" }}]},
                    "usage": {"input_tokens": self.prompt, "output_tokens": so_far, "total_tokens": self.prompt + so_far},
                    "request_id": "mock"});
                if !self.usage {
                    strip_usage(&mut v);
                }
                format!("id:{}\nevent:result\n:HTTP_STATUS/200\ndata:{v}\n\n", i + 1)
            }
            Provider::Embeddings => String::new(),
        }
    }
}

fn sse(event: Option<&str>, data: &str) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// `n` bytes of plain ASCII text (nothing a JSON encoder escapes).
pub fn text(n: u64) -> String {
    const WORDS: &[u8] = b"lorem ipsum dolor sit amet consectetur adipiscing elit ";
    (0..n as usize)
        .map(|i| char::from(WORDS[i % WORDS.len()]))
        .collect()
}

fn strip_usage(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("usage");
            map.remove("usageMetadata");
            map.values_mut().for_each(strip_usage);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_usage),
        _ => {}
    }
}

/// The error body a provider sends with a failing status.
pub fn error_body(status: u16) -> String {
    json!({"error": {"message": format!("mock upstream error {status}"), "type": "server_error", "code": status}})
        .to_string()
}
