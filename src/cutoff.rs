//! Ending a stream whose output passes what its budget can pay for (`stream_cutoff`, and every
//! request under `reserve.trim`): the plugin stops forwarding at an event boundary and sends
//! the client the end the provider itself sends at an output cap, so an SDK finishes cleanly
//! with a stop reason it knows (`length`, `max_tokens`, `max_output_tokens`, `MAX_TOKENS`).
//!
//! What a stream may cost is fixed at admission: what the check set aside for it plus what the
//! check reported left ([`Allowance`]). The response is watched a slice at a time (one body
//! callback, at most 64 KiB): when what it would be charged if it ended now passes the
//! allowance, the stream ends at the last event boundary of that slice (or the first one after
//! it, when an event spans slices). What follows is never forwarded nor charged; the upstream
//! is reset once it has had `drain` to end on its own.

use serde_json::{json, Value};

use crate::body::Api;
use crate::strip::EventEnds;
use crate::usage::Usage;

/// What a stream may be charged in all, per currency; `u64::MAX` where no bound is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub tokens: u64,
    /// Micro units of the currency of the limits in money.
    pub micros: u64,
}

impl Allowance {
    /// Whether a charge of `tokens` and `micros` passes it.
    pub fn passed_by(&self, tokens: u64, micros: u64) -> bool {
        tokens > self.tokens || micros > self.micros
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Watching,
    /// Passed in a slice without an event boundary: it ends at the next one.
    Crossed,
    /// Ended (the client has its end) at this time.
    Ended {
        at_ms: u64,
    },
    /// The provider ended its answer itself: nothing more is watched.
    Answered,
}

/// What becomes of one slice of the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// It goes to the client whole.
    Pass,
    /// Its first `keep` bytes go to the client, then the stream's end; the rest never does.
    End { keep: usize },
}

/// One stream's watch: see the module documentation.
#[derive(Debug, Clone)]
pub struct Cutoff {
    allowance: Allowance,
    api: Api,
    drain_ms: u64,
    ends: EventEnds,
    phase: Phase,
    /// When the charge passed within an event that has not ended yet.
    crossed_at_ms: u64,
    /// Choices whose end the provider sent (`finish_reason`), of `choices`.
    finished: u32,
    choices: u32,
    /// The stream was ended between the CR and the LF of a CR LF: the end starts with the LF.
    lf_owed: bool,
}

impl Cutoff {
    /// A watch over a stream of `api` (`None` for an API whose end the plugin cannot write, or
    /// when no bound is known).
    pub fn new(api: Api, allowance: Allowance, drain_ms: u64) -> Option<Cutoff> {
        let bounded = allowance.tokens < u64::MAX || allowance.micros < u64::MAX;
        (bounded && api != Api::Other).then_some(Cutoff {
            allowance,
            api,
            drain_ms,
            ends: EventEnds::default(),
            phase: Phase::Watching,
            crossed_at_ms: 0,
            finished: 0,
            choices: 1,
            lf_owed: false,
        })
    }

    /// The choices a stream carries (`n`): a chat stream is answered when each has finished.
    pub fn with_choices(self, choices: u32) -> Cutoff {
        Cutoff {
            choices: choices.max(1),
            ..self
        }
    }

    pub fn allowance(&self) -> Allowance {
        self.allowance
    }

    /// The stream was ended: nothing more of it is forwarded or counted.
    pub fn ended(&self) -> bool {
        matches!(self.phase, Phase::Ended { .. })
    }

    /// A slice of the stream, handed to `feed` an event at a time (the bytes up to each
    /// event boundary, then the rest); `feed` counts them and answers whether the stream's
    /// charge now passes the allowance. The stream ends at the first boundary where it does
    /// (bytes after it are never fed, so never charged), or, when it passes within an event,
    /// at that event's end. On [`Cut::End`], the stream is ended at `now_ms`.
    pub fn slice(&mut self, slice: &[u8], now_ms: u64, mut feed: impl FnMut(&[u8]) -> bool) -> Cut {
        let mut from = 0;
        for (i, &b) in slice.iter().enumerate() {
            if !self.ends.ends_event(b) || !self.watching() {
                continue;
            }
            let event = slice.get(from..=i).unwrap_or_default();
            from = i + 1;
            let over = feed(event);
            // The provider's own end (and the usage after it) is never cut: the answer is
            // whole, and charged as it reports.
            if self.answered(event) {
                self.phase = Phase::Answered;
            } else if over || self.phase == Phase::Crossed {
                return self.end(slice, i + 1, now_ms);
            }
        }
        let rest = slice.get(from..).unwrap_or_default();
        if feed(rest) && self.phase == Phase::Watching && !self.answered(rest) {
            self.phase = Phase::Crossed;
            self.crossed_at_ms = now_ms;
        }
        Cut::Pass
    }

    fn watching(&self) -> bool {
        matches!(self.phase, Phase::Watching | Phase::Crossed)
    }

    /// Whether `event` (or part of one) is the provider ending its answer: a finish reason on
    /// every choice (OpenAI), a stop reason or `message_stop` (Anthropic), the Responses API's
    /// last event, Gemini's `finishReason`. Only unescaped JSON keys count: generated text
    /// cannot spell them.
    fn answered(&mut self, event: &[u8]) -> bool {
        match self.api {
            Api::Chat | Api::Completions => {
                let n = string_values(event, b"\"finish_reason\"");
                self.finished = self.finished.saturating_add(n);
                self.finished >= self.choices
            }
            Api::Messages => {
                string_values(event, b"\"stop_reason\"") > 0
                    || find(event, b"\"type\":\"message_stop\"")
            }
            Api::Responses => [
                b"\"type\":\"response.completed\"".as_slice(),
                b"\"type\":\"response.incomplete\"",
                b"\"type\":\"response.failed\"",
            ]
            .iter()
            .any(|p| find(event, p)),
            Api::Gemini => string_values(event, b"\"finishReason\"") > 0,
            Api::Other => false,
        }
    }

    /// The charge passed within one event that has not ended for `drain_ms`: an event the
    /// plugin cannot end, so the stream is reset.
    pub fn stuck(&self, now_ms: u64) -> bool {
        self.phase == Phase::Crossed && now_ms.saturating_sub(self.crossed_at_ms) >= self.drain_ms
    }

    fn end(&mut self, slice: &[u8], mut keep: usize, now_ms: u64) -> Cut {
        self.phase = Phase::Ended { at_ms: now_ms };
        // An event ended by CR LF CR LF ends at its second CR: its LF goes too.
        if keep.checked_sub(1).and_then(|i| slice.get(i)) == Some(&b'\r') {
            match slice.get(keep) {
                Some(b'\n') => keep += 1,
                Some(_) => {}
                None => self.lf_owed = true,
            }
        }
        Cut::End { keep }
    }

    /// The stream was ended and the upstream still sends at `now_ms`: whether its drain is
    /// over (the stream is then reset).
    pub fn reset_due(&self, now_ms: u64) -> bool {
        match self.phase {
            Phase::Ended { at_ms } => now_ms.saturating_sub(at_ms) >= self.drain_ms,
            _ => false,
        }
    }

    /// The events that end the stream in the API's own shape.
    pub fn ending(&self, facts: &Ending) -> Vec<u8> {
        let end = ending(self.api, facts);
        if self.lf_owed {
            [b"\n".as_slice(), &end].concat()
        } else {
            end
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// How many times `key` has a string value (`"key": "…"`, spaces allowed) in `event`.
fn string_values(event: &[u8], key: &[u8]) -> u32 {
    let blank = |b: &&u8| **b == b' ' || **b == b'\t';
    let mut n = 0u32;
    let mut rest = event;
    while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
        rest = rest.get(at + key.len()..).unwrap_or_default();
        let mut after = rest.iter().skip_while(blank);
        if after.next() == Some(&b':') && after.find(|b| !blank(b)) == Some(&b'"') {
            n = n.saturating_add(1);
        }
    }
    n
}

/// What the end of a cut stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The model the stream named (else the request's), as it is echoed in each chunk.
    pub model: String,
    /// The id the stream named (SDKs check that a Responses stream keeps its id).
    pub id: Option<String>,
    /// What the stream is charged, as the provider's usage would say it.
    pub usage: Usage,
    /// Choices the request asked for (`n`): each gets its end.
    pub choices: u32,
    /// The client asked for usage in the stream (OpenAI's `stream_options.include_usage`).
    pub usage_chunk: bool,
    /// Events seen so far (the Responses API numbers its events).
    pub events: u64,
    pub created_s: u64,
}

fn event(name: Option<&str>, data: &Value, out: &mut Vec<u8>) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// See [`Cutoff::ending`].
fn ending(api: Api, f: &Ending) -> Vec<u8> {
    let mut out = Vec::new();
    let u = &f.usage;
    let openai_usage = json!({
        "prompt_tokens": u.prompt, "completion_tokens": u.completion, "total_tokens": u.total,
    });
    match api {
        Api::Chat | Api::Completions => {
            let (object, id) = match api {
                Api::Chat => ("chat.completion.chunk", "chatcmpl-cutoff"),
                _ => ("text_completion", "cmpl-cutoff"),
            };
            let id = f.id.as_deref().unwrap_or(id);
            let choices: Vec<Value> = (0..f.choices.max(1))
                .map(|index| match api {
                    Api::Chat => json!({"index": index, "delta": {}, "logprobs": null,
                        "finish_reason": "length"}),
                    _ => json!({"index": index, "text": "", "logprobs": null,
                        "finish_reason": "length"}),
                })
                .collect();
            let chunk = |choices: Vec<Value>| {
                json!({"id": id, "object": object, "created": f.created_s, "model": f.model,
                    "choices": choices})
            };
            event(None, &chunk(choices), &mut out);
            if f.usage_chunk {
                let mut last = chunk(Vec::new());
                last["usage"] = openai_usage;
                event(None, &last, &mut out);
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        Api::Responses => {
            // No `output`: an SDK keeps what it gathered from the stream.
            let response = json!({
                "id": f.id.as_deref().unwrap_or("resp_cutoff"), "object": "response",
                "created_at": f.created_s,
                "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                "model": f.model,
                "usage": {"input_tokens": u.prompt, "output_tokens": u.completion,
                    "total_tokens": u.total, "input_tokens_details": {"cached_tokens": u.cached},
                    "output_tokens_details": {"reasoning_tokens": u.reasoning}},
            });
            let data = json!({"type": "response.incomplete", "sequence_number": f.events,
                "response": response});
            event(Some("response.incomplete"), &data, &mut out);
        }
        Api::Messages => {
            let delta = json!({"type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                "usage": {"output_tokens": u.completion}});
            event(Some("message_delta"), &delta, &mut out);
            event(
                Some("message_stop"),
                &json!({"type": "message_stop"}),
                &mut out,
            );
        }
        Api::Gemini => {
            let last = json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                    "finishReason": "MAX_TOKENS", "index": 0}],
                "usageMetadata": {"promptTokenCount": u.prompt,
                    "candidatesTokenCount": u.completion, "totalTokenCount": u.total},
                "modelVersion": f.model,
            });
            event(None, &last, &mut out);
        }
        Api::Other => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `slice` with a charge that passes from the `n`-th event fed on (`None`: never).
    fn feed(c: &mut Cutoff, slice: &[u8], over_from: Option<usize>, now: u64) -> Cut {
        let mut n = 0;
        c.slice(slice, now, |_| {
            n += 1;
            over_from.is_some_and(|k| n >= k)
        })
    }

    fn watch() -> Cutoff {
        let allowance = Allowance {
            tokens: 100,
            micros: u64::MAX,
        };
        Cutoff::new(Api::Chat, allowance, 1000).unwrap()
    }

    #[test]
    fn only_a_bound_and_a_known_shape_are_watched() {
        let none = Allowance {
            tokens: u64::MAX,
            micros: u64::MAX,
        };
        assert!(Cutoff::new(Api::Chat, none, 0).is_none());
        let money = Allowance {
            tokens: u64::MAX,
            micros: 5,
        };
        assert!(Cutoff::new(Api::Messages, money, 0).is_some());
        assert!(Cutoff::new(Api::Other, money, 0).is_none());
        assert!(money.passed_by(0, 6) && !money.passed_by(u64::MAX - 1, 5));
    }

    #[test]
    fn a_stream_ends_at_the_boundary_of_the_event_that_passed() {
        let mut c = watch();
        assert_eq!(feed(&mut c, b"data: 1\n\ndata: 2\n\n", None, 1), Cut::Pass);
        assert!(!c.ended());
        let cut = feed(&mut c, b"data: 3\n\ndata: 4\n\ndata: 5", Some(2), 2);
        assert_eq!(cut, Cut::End { keep: 18 });
        assert!(c.ended());
        assert!(!c.reset_due(1001) && c.reset_due(1002));
        let cut = feed(&mut c, b"data: 6\n\n", Some(1), 3);
        assert_eq!(cut, Cut::Pass, "an ended stream is not cut again");
    }

    #[test]
    fn only_the_bytes_up_to_the_end_are_fed() {
        let mut c = watch();
        let mut fed = Vec::new();
        let cut = c.slice(b"data: 1\n\ndata: 2\n\ndata: 3\n\n", 0, |bytes| {
            fed.extend_from_slice(bytes);
            fed.len() > 9
        });
        assert_eq!(cut, Cut::End { keep: 18 });
        assert_eq!(fed, b"data: 1\n\ndata: 2\n\n");
    }

    #[test]
    fn an_event_across_slices_ends_at_the_next_boundary() {
        for nl in ["\n\n", "\r\n\r\n", "\r\r"] {
            let mut c = watch();
            assert_eq!(
                feed(&mut c, b"data: {\"a\":", Some(1), 0),
                Cut::Pass,
                "{nl:?}"
            );
            let rest = format!("1}}{nl}data: 2{nl}");
            // The first boundary: after its last byte.
            let keep = 2 + nl.len();
            assert_eq!(
                feed(&mut c, rest.as_bytes(), None, 0),
                Cut::End { keep },
                "{nl:?}"
            );
        }
    }

    #[test]
    fn the_providers_own_end_is_never_cut() {
        let ends: [(Api, &[u8]); 5] = [
            (
                Api::Chat,
                b"data: {\"choices\":[{\"delta\":{},\"finish_reason\": \"stop\"}]}\n\n",
            ),
            (
                Api::Messages,
                b"event: message_delta\ndata: {\"delta\":{\"stop_reason\":\"end_turn\"}}\n\n",
            ),
            (
                Api::Messages,
                b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
            (
                Api::Responses,
                b"data: {\"type\":\"response.completed\",\"response\":{}}\n\n",
            ),
            (
                Api::Gemini,
                b"data: {\"candidates\":[{\"finishReason\":\"STOP\"}]}\r\n\r\n",
            ),
        ];
        let allowance = Allowance {
            tokens: 1,
            micros: u64::MAX,
        };
        for (api, end) in ends {
            let mut c = Cutoff::new(api, allowance, 0).unwrap();
            // The end's usage passes the allowance; the usage chunk after it too.
            assert_eq!(feed(&mut c, end, Some(1), 0), Cut::Pass, "{api:?}");
            assert_eq!(
                feed(&mut c, b"data: {\"usage\":{}}\n\n", Some(1), 0),
                Cut::Pass
            );
            assert!(!c.ended());
        }
    }

    #[test]
    fn generated_text_and_a_null_reason_do_not_end_the_answer() {
        let allowance = Allowance {
            tokens: 1,
            micros: u64::MAX,
        };
        let mut c = Cutoff::new(Api::Chat, allowance, 0)
            .unwrap()
            .with_choices(2);
        let text = br#"data: {"choices":[{"delta":{"content":"\"finish_reason\":\"stop\" message_stop"},"finish_reason":null}]}"#;
        assert_eq!(
            feed(&mut c, &[text.as_slice(), b"\n\n"].concat(), None, 0),
            Cut::Pass
        );
        let one = b"data: {\"choices\":[{\"index\":0,\"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(feed(&mut c, one, None, 0), Cut::Pass);
        // One of two choices finished: the other is still watched.
        assert_eq!(
            feed(&mut c, b"data: {}\n\n", Some(1), 0),
            Cut::End { keep: 10 }
        );
    }

    #[test]
    fn an_event_that_never_ends_is_stuck_after_the_drain() {
        let mut c = watch();
        assert_eq!(
            feed(&mut c, b"data: {\"a\":\"xxxx", Some(1), 100),
            Cut::Pass
        );
        assert!(!c.stuck(1099) && c.stuck(1100));
    }

    #[test]
    fn a_cut_between_cr_and_lf_owes_the_lf() {
        let mut c = watch();
        assert_eq!(
            feed(&mut c, b"data: 1\r\n\r", Some(1), 0),
            Cut::End { keep: 10 }
        );
        let end = c.ending(&facts(false));
        assert!(end.starts_with(b"\ndata: {"));
    }

    #[test]
    fn boundaries_split_across_slices_are_found() {
        let mut c = watch();
        assert_eq!(feed(&mut c, b"data: 1\n", None, 0), Cut::Pass);
        assert_eq!(
            feed(&mut c, b"\ndata: 2\r\n", Some(1), 0),
            Cut::End { keep: 1 }
        );
    }

    fn facts(usage_chunk: bool) -> Ending {
        Ending {
            model: "m-1".into(),
            id: Some("resp_1".into()),
            usage: Usage {
                prompt: 10,
                completion: 90,
                total: 100,
                ..Usage::default()
            },
            choices: 2,
            usage_chunk,
            events: 7,
            created_s: 1_700_000_000,
        }
    }

    /// The `data` of each event, parsed.
    fn events(bytes: &[u8]) -> Vec<(Option<String>, String)> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with("\n\n"), "{text}");
        text.trim_end()
            .split("\n\n")
            .map(|e| {
                let mut name = None;
                let mut data = String::new();
                for line in e.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = d.to_string();
                    }
                }
                (name, data)
            })
            .collect()
    }

    fn json(data: &str) -> Value {
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn openai_chat_ends_with_length_usage_when_asked_and_done() {
        let e = events(&ending(Api::Chat, &facts(true)));
        assert_eq!(e.len(), 3);
        let finish = json(&e[0].1);
        assert_eq!(finish["object"], "chat.completion.chunk");
        assert_eq!(finish["model"], "m-1");
        for i in 0..2 {
            assert_eq!(finish["choices"][i]["index"], i);
            assert_eq!(finish["choices"][i]["finish_reason"], "length");
        }
        let usage = json(&e[1].1);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 90);
        assert_eq!(e[2].1, "[DONE]");
        let e = events(&ending(Api::Chat, &facts(false)));
        assert_eq!((e.len(), e[1].1.as_str()), (2, "[DONE]"));
        let c = events(&ending(Api::Completions, &facts(false)));
        assert_eq!(json(&c[0].1)["choices"][1]["finish_reason"], "length");
    }

    #[test]
    fn responses_anthropic_and_gemini_end_in_their_shapes() {
        let r = events(&ending(Api::Responses, &facts(false)));
        assert_eq!(r[0].0.as_deref(), Some("response.incomplete"));
        let v = json(&r[0].1);
        assert_eq!(v["sequence_number"], 7);
        assert_eq!(v["response"]["id"], "resp_1", "the stream's own id");
        assert!(v["response"].get("output").is_none());
        assert_eq!(v["response"]["status"], "incomplete");
        assert_eq!(
            v["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(v["response"]["usage"]["output_tokens"], 90);

        let a = events(&ending(Api::Messages, &facts(false)));
        assert_eq!(a[0].0.as_deref(), Some("message_delta"));
        let delta = json(&a[0].1);
        assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
        assert_eq!(delta["usage"]["output_tokens"], 90);
        assert_eq!(a[1].0.as_deref(), Some("message_stop"));

        let g = events(&ending(Api::Gemini, &facts(false)));
        let last = json(&g[0].1);
        assert_eq!(last["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 90);
        assert!(ending(Api::Other, &facts(false)).is_empty());
    }
}
