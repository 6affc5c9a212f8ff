//! Usage as the providers report it ([`UsageFields`], with Anthropic's [`Iterations`]),
//! normalised ([`Usage`]), and what the response phase saw of one response ([`Observed`]).

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

    pub(super) fn found(&self) -> bool {
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
