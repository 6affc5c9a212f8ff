//! Token usage: finding it in a response body as it streams by, and turning it into the tokens
//! a request is charged (DESIGN section 6).

mod fields;
mod json;
mod scanner;
mod sse;

pub use fields::{Iterations, Observed, Usage, UsageFields};
pub use json::{parse_count, JsonScanner};
pub use scanner::{is_encoded, BodyFormat, UsageScanner};
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
