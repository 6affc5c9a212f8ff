//! Token usage: finding it in a response body as it streams by, and turning it into the tokens
//! a request is charged (DESIGN section 6).

mod json;
mod scanner;
mod sse;

pub use json::{parse_count, JsonScanner};
pub use scanner::{BodyFormat, UsageScanner};
pub use sse::SseParser;

/// Which tokens a request is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    Total,
    Prompt,
    Completion,
    /// Prompt tokens read from a cache weigh `cached_prompt` (the `prompt` weight unless
    /// configured).
    Weighted {
        prompt: f64,
        cached_prompt: f64,
        completion: f64,
    },
}

/// What a successful response without usage is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    Estimate,
    Zero,
}

/// Usage figures under the names every provider uses, as last reported (providers that stream
/// usage send cumulative figures, so the last value of each field is the answer).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsageFields {
    /// `prompt_tokens`, `input_tokens`, `promptTokenCount`.
    pub prompt: Option<u64>,
    /// Anthropic's `cache_creation_input_tokens`, billed as input beside `input_tokens`.
    pub cache_creation: Option<u64>,
    /// Of those, written for an hour (`cache_creation.ephemeral_1h_input_tokens`): billed at
    /// another price than the 5-minute writes.
    pub cache_write_1h: Option<u64>,
    /// Anthropic's `cache_read_input_tokens`.
    pub cache_read: Option<u64>,
    /// `completion_tokens`, `output_tokens`, `candidatesTokenCount`.
    pub completion: Option<u64>,
    /// Gemini's `thoughtsTokenCount`, billed as output beside `candidatesTokenCount`.
    pub thoughts: Option<u64>,
    /// `total_tokens`, `totalTokenCount`.
    pub total: Option<u64>,
    /// Of the prompt, read from a cache: OpenAI `prompt_tokens_details.cached_tokens`
    /// (`input_tokens_details` in the Responses API), Gemini `cachedContentTokenCount`.
    pub cached: Option<u64>,
    /// Of the completion, spent reasoning: OpenAI `completion_tokens_details.reasoning_tokens`
    /// (`output_tokens_details`).
    pub reasoning: Option<u64>,
    /// Gemini's `toolUsePromptTokenCount`: prompt tokens of tool results, in
    /// `totalTokenCount` but not in `promptTokenCount`.
    pub tool_prompt: Option<u64>,
    /// Anthropic's `usage.iterations`: every billed step (context compaction, the advisor),
    /// summed. When present, the top-level figures are the last step's only, and these are
    /// the bill.
    pub iterations: Option<Iterations>,
}

/// Anthropic's per-iteration usage, summed over the steps of one answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Iterations {
    /// Steps listed (an empty list says nothing: the top-level figures stand).
    pub steps: u32,
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_creation: u64,
}

impl Iterations {
    /// Adds one step's `key` figure.
    pub fn add(&mut self, key: &[u8], value: u64) {
        let slot = match key {
            b"input_tokens" => &mut self.input,
            b"output_tokens" => &mut self.output,
            b"cache_read_input_tokens" => &mut self.cache_read,
            b"cache_creation_input_tokens" => &mut self.cache_creation,
            _ => return,
        };
        *slot = slot.saturating_add(value);
    }
}

impl UsageFields {
    /// Records `value` when `key` names a usage field.
    pub fn set(&mut self, key: &[u8], value: u64) {
        let slot = match key {
            b"prompt_tokens" | b"input_tokens" | b"promptTokenCount" => &mut self.prompt,
            b"cache_creation_input_tokens" => &mut self.cache_creation,
            b"cache_read_input_tokens" => &mut self.cache_read,
            b"completion_tokens" | b"output_tokens" | b"candidatesTokenCount" => {
                &mut self.completion
            }
            b"thoughtsTokenCount" => &mut self.thoughts,
            b"total_tokens" | b"totalTokenCount" => &mut self.total,
            b"cachedContentTokenCount" => &mut self.cached,
            b"toolUsePromptTokenCount" => &mut self.tool_prompt,
            _ => return,
        };
        *slot = Some(value);
    }

    fn found(&self) -> bool {
        self.prompt.is_some()
            || self.completion.is_some()
            || self.total.is_some()
            || self.iterations.is_some()
    }

    /// The provider's figures normalised to prompt / completion / total.
    pub fn normalise(&self) -> Usage {
        let top = self.top_level();
        let Some(steps) = self.iterations.filter(|i| i.steps > 0) else {
            return top;
        };
        // Every step's input and output; cache figures per step when the steps give them, else
        // the top level's (which then stand for the whole answer). Never less than the top
        // level says (a stream cut inside the list has summed only some steps).
        let cache_read = steps.cache_read.max(self.cache_read.unwrap_or(0));
        let cache_creation = steps.cache_creation.max(self.cache_creation.unwrap_or(0));
        let prompt = steps
            .input
            .saturating_add(cache_read)
            .saturating_add(cache_creation)
            .max(top.prompt);
        let completion = steps.output.max(top.completion);
        let cached = cache_read.min(prompt);
        let (cache_write, cache_write_1h) =
            self.cache_writes(cache_creation, prompt.saturating_sub(cached));
        Usage {
            prompt,
            completion,
            total: prompt.saturating_add(completion).max(top.total),
            cached,
            cache_write,
            cache_write_1h,
            reasoning: top.reasoning.min(completion),
        }
    }

    /// `written` cache tokens split into 5-minute and 1-hour writes, within `room` (the prompt
    /// not read from the cache).
    fn cache_writes(&self, written: u64, room: u64) -> (u64, u64) {
        let written = written.min(room);
        let hour = self.cache_write_1h.unwrap_or(0).min(written);
        (written - hour, hour)
    }

    /// The top-level figures normalised (without `iterations`).
    fn top_level(&self) -> Usage {
        let prompt = self
            .prompt
            .unwrap_or(0)
            .saturating_add(self.cache_creation.unwrap_or(0))
            .saturating_add(self.cache_read.unwrap_or(0))
            .saturating_add(self.tool_prompt.unwrap_or(0));
        let completion = self
            .completion
            .unwrap_or(0)
            .saturating_add(self.thoughts.unwrap_or(0));
        let total = self
            .total
            .unwrap_or(0)
            .max(prompt.saturating_add(completion));
        // Anthropic's cache reads are part of the prompt once added to it above.
        let cached = self.cached.or(self.cache_read).unwrap_or(0).min(prompt);
        let (cache_write, cache_write_1h) = self.cache_writes(
            self.cache_creation.unwrap_or(0),
            prompt.saturating_sub(cached),
        );
        Usage {
            prompt,
            completion,
            total,
            cached,
            cache_write,
            cache_write_1h,
            // Gemini's thoughts are added to the completion above.
            reasoning: self
                .reasoning
                .or(self.thoughts)
                .unwrap_or(0)
                .min(completion),
        }
    }
}

/// Usage normalised across providers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Of `prompt`, read from the provider's prompt cache.
    pub cached: u64,
    /// Of `prompt`, written to the provider's prompt cache for 5 minutes (Anthropic), and for
    /// an hour.
    pub cache_write: u64,
    pub cache_write_1h: u64,
    /// Of `completion`, spent on reasoning.
    pub reasoning: u64,
}

impl From<Usage> for wire::UsageFigures {
    fn from(u: Usage) -> wire::UsageFigures {
        wire::UsageFigures {
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            total_tokens: u.total,
            cached_prompt_tokens: u.cached,
            reasoning_tokens: u.reasoning,
        }
    }
}

/// What the response phase saw of one response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The upstream's `:status`; `None` when no response headers arrived.
    pub status: Option<u32>,
    pub fields: UsageFields,
    /// Bytes of generated text seen (for the estimate).
    pub text_bytes: u64,
    /// Bytes of body seen.
    pub body_bytes: u64,
    /// The body could not be read for usage (compressed).
    pub opaque: bool,
    /// The response ended normally; `false` when the client or the upstream cut it short.
    pub complete: bool,
    /// The request body's size, when known, for estimating the prompt.
    pub request_bytes: Option<u64>,
}

/// Where a charge came from, for the metrics and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The provider's usage.
    Reported,
    /// No (complete) usage: estimated from what was seen.
    Estimated,
    /// No usage and `on_missing: zero`.
    Missing,
    /// The upstream failed (a status other than 2xx): nothing is charged.
    UpstreamError,
    /// The client went away before any response headers: the upstream may go on generating
    /// (and billing), so the reservation, or the prompt's estimate, is charged.
    Abandoned,
}

/// The tokens one request is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    pub usage: Usage,
    pub basis: Basis,
}

/// Bytes per token for estimates: the usual rule of thumb for English text and JSON.
pub const BYTES_PER_TOKEN: u64 = 4;

/// Settles what a response costs.
///
/// * a status other than 2xx, or no response at all: 0 (the reserve is refunded).
/// * usage found in a complete response: that usage.
/// * a response cut short: what was seen, never less than the estimate of the text delivered.
/// * no usage (or an unreadable body): `on_missing` — an estimate (prompt from the request size,
///   completion from the generated text, or the raw body when it was unreadable) or zero.
pub fn settle(count: Count, on_missing: OnMissing, seen: &Observed) -> Charge {
    if !seen.status.is_some_and(|s| (200..300).contains(&s)) {
        return Charge {
            tokens: 0,
            usage: Usage::default(),
            basis: Basis::UpstreamError,
        };
    }
    let reported = seen.fields.found();
    if reported && seen.complete {
        let usage = seen.fields.normalise();
        return Charge {
            tokens: charge(count, &usage),
            usage,
            basis: Basis::Reported,
        };
    }
    if !reported && seen.complete && on_missing == OnMissing::Zero {
        return Charge {
            tokens: 0,
            usage: Usage::default(),
            basis: Basis::Missing,
        };
    }
    // Estimated: missing usage under `estimate`, or a stream cut short (always charged what it
    // delivered, else aborting just before the usage chunk would make every stream free).
    let text = if seen.opaque {
        seen.body_bytes
    } else {
        seen.text_bytes
    };
    let mut usage = seen.fields.normalise();
    if seen.fields.prompt.is_none() {
        usage.prompt = seen.request_bytes.unwrap_or(0).div_ceil(BYTES_PER_TOKEN);
    }
    usage.completion = usage.completion.max(text.div_ceil(BYTES_PER_TOKEN));
    usage.total = usage.prompt.saturating_add(usage.completion);
    Charge {
        tokens: charge(count, &usage),
        usage,
        basis: Basis::Estimated,
    }
}

/// What a request costs whose client left before the response began: its reservation
/// (`reserved` output tokens), or without one the prompt as estimated from the request's size.
/// The upstream saw the request and may bill it whole; nothing less is ever charged for it.
pub fn abandoned(count: Count, request_bytes: Option<u64>, reserved: u64) -> Charge {
    let prompt = request_bytes.unwrap_or(0).div_ceil(BYTES_PER_TOKEN);
    let usage = Usage {
        prompt,
        completion: reserved,
        total: prompt.saturating_add(reserved),
        ..Usage::default()
    };
    let tokens = if reserved > 0 {
        reserved
    } else {
        charge(count, &usage)
    };
    Charge {
        tokens,
        usage,
        basis: Basis::Abandoned,
    }
}

/// The tokens `usage` costs under `count`; weights round up.
pub fn charge(count: Count, usage: &Usage) -> u64 {
    match count {
        Count::Total => usage.total,
        Count::Prompt => usage.prompt,
        Count::Completion => usage.completion,
        Count::Weighted {
            prompt,
            cached_prompt,
            completion,
        } => {
            let fresh = usage.prompt.saturating_sub(usage.cached);
            let t = fresh as f64 * prompt
                + usage.cached as f64 * cached_prompt
                + usage.completion as f64 * completion;
            // `as` saturates; NaN (impossible with validated weights) becomes 0.
            t.ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(fields: UsageFields) -> Observed {
        Observed {
            status: Some(200),
            fields,
            complete: true,
            ..Observed::default()
        }
    }

    #[test]
    fn counts() {
        let u = Usage {
            prompt: 10,
            completion: 95,
            total: 105,
            ..Usage::default()
        };
        assert_eq!(charge(Count::Total, &u), 105);
        assert_eq!(charge(Count::Prompt, &u), 10);
        assert_eq!(charge(Count::Completion, &u), 95);
        assert_eq!(
            charge(
                Count::Weighted {
                    prompt: 0.5,
                    cached_prompt: 0.5,
                    completion: 4.0
                },
                &u
            ),
            385
        );
        assert_eq!(
            charge(
                Count::Weighted {
                    prompt: 0.01,
                    cached_prompt: 0.01,
                    completion: 0.0
                },
                &u
            ),
            1
        );
        // Cached prompt tokens at a tenth: 20 fresh + 80 × 0.1 + 50.
        let cached = Usage {
            prompt: 100,
            cached: 80,
            completion: 50,
            total: 150,
            reasoning: 30,
            ..Usage::default()
        };
        assert_eq!(
            charge(
                Count::Weighted {
                    prompt: 1.0,
                    cached_prompt: 0.1,
                    completion: 1.0
                },
                &cached
            ),
            78
        );
    }

    #[test]
    fn normalisation() {
        let mut f = UsageFields::default();
        f.set(b"input_tokens", 10);
        f.set(b"cache_read_input_tokens", 100);
        f.set(b"cache_creation_input_tokens", 5);
        f.set(b"output_tokens", 7);
        assert_eq!(
            f.normalise(),
            Usage {
                prompt: 115,
                completion: 7,
                total: 122,
                cached: 100,
                cache_write: 5,
                reasoning: 0,
                ..Usage::default()
            }
        );
        let mut g = UsageFields::default();
        g.set(b"promptTokenCount", 4);
        g.set(b"candidatesTokenCount", 6);
        g.set(b"thoughtsTokenCount", 20);
        g.set(b"totalTokenCount", 30);
        assert_eq!(
            g.normalise(),
            Usage {
                prompt: 4,
                completion: 26,
                total: 30,
                cached: 0,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 20,
            }
        );
    }

    #[test]
    fn a_request_abandoned_before_its_response_is_charged() {
        let reserved = abandoned(Count::Total, Some(400), 50);
        assert_eq!((reserved.tokens, reserved.basis), (50, Basis::Abandoned));
        // Without a reservation: the prompt, estimated from the request's 400 bytes.
        let c = abandoned(Count::Total, Some(400), 0);
        assert_eq!((c.tokens, c.usage.prompt), (100, 100));
        assert_eq!(abandoned(Count::Completion, Some(400), 0).tokens, 0);
    }

    #[test]
    fn settlement() {
        let mut f = UsageFields::default();
        f.set(b"total_tokens", 50);
        let c = settle(Count::Total, OnMissing::Zero, &seen(f));
        assert_eq!((c.tokens, c.basis), (50, Basis::Reported));

        for status in [429, 500, 304] {
            let error = Observed {
                status: Some(status),
                ..seen(f)
            };
            assert_eq!(
                settle(Count::Total, OnMissing::Estimate, &error).basis,
                Basis::UpstreamError
            );
        }
        let none = Observed {
            status: None,
            ..seen(f)
        };
        assert_eq!(settle(Count::Total, OnMissing::Estimate, &none).tokens, 0);

        let missing = Observed {
            text_bytes: 41,
            request_bytes: Some(400),
            ..seen(UsageFields::default())
        };
        assert_eq!(
            settle(Count::Total, OnMissing::Zero, &missing).basis,
            Basis::Missing
        );
        let c = settle(Count::Total, OnMissing::Estimate, &missing);
        assert_eq!((c.tokens, c.basis), (100 + 11, Basis::Estimated));

        // Cut short after Anthropic's message_start: its prompt, the text seen as completion,
        // even under `zero`.
        let mut start = UsageFields::default();
        start.set(b"input_tokens", 30);
        start.set(b"output_tokens", 1);
        let cut = Observed {
            complete: false,
            text_bytes: 80,
            ..seen(start)
        };
        let c = settle(Count::Total, OnMissing::Zero, &cut);
        assert_eq!((c.tokens, c.basis), (30 + 20, Basis::Estimated));

        let opaque = Observed {
            opaque: true,
            body_bytes: 400,
            ..seen(UsageFields::default())
        };
        assert_eq!(
            settle(Count::Completion, OnMissing::Estimate, &opaque).tokens,
            100
        );
    }
}
