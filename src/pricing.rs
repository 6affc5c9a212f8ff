//! Money: a price table per model, what a request's usage costs, and amounts written as
//! decimals. Costs are whole micro units (millionths of the currency) and prices are micro
//! units per million tokens, so every figure is an integer and nothing drifts through rounding:
//! a request's cost is rounded up once, to the next micro unit.

use regex::Regex;

use crate::usage::Usage;

/// Prices per million tokens, in micro units of the table's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: u64,
    /// Prompt tokens read from the provider's cache (the input price unless given).
    pub cached_input: u64,
    pub output: u64,
    /// Reasoning tokens (the output price unless given).
    pub reasoning: u64,
    /// Prompt tokens written to the provider's cache for 5 minutes, and for an hour (Anthropic
    /// bills them at 1.25× and 2× the input price: those are the defaults).
    pub cache_write: u64,
    pub cache_write_1h: u64,
}

/// What one model costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub rates: Rates,
    /// Other rates for an answer whose prompt is larger than a size.
    pub long_context: Option<LongContext>,
}

/// Rates for an answer whose prompt has more than `above_prompt_tokens` tokens: Gemini and
/// Anthropic bill every token of such a request at higher prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LongContext {
    pub above_prompt_tokens: u64,
    pub rates: Rates,
}

impl From<Rates> for Price {
    fn from(rates: Rates) -> Price {
        Price {
            rates,
            long_context: None,
        }
    }
}

impl Price {
    /// What `usage` costs, in micro units, rounded up; at most the wire's bound. A prompt
    /// above the long-context size prices every token of the answer at those rates.
    pub fn cost(&self, usage: &Usage) -> u64 {
        match self.long_context {
            Some(l) if usage.prompt > l.above_prompt_tokens => l.rates.cost(usage),
            _ => self.rates.cost(usage),
        }
    }
}

impl Rates {
    /// What `usage` costs at these rates, in micro units, rounded up; at most the wire's bound.
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage.cached.min(usage.prompt);
        let written = usage.prompt - cached;
        let hour = usage.cache_write_1h.min(written);
        let minutes = usage.cache_write.min(written - hour);
        let reasoning = usage.reasoning.min(usage.completion);
        let parts = [
            (written - hour - minutes, self.input),
            (cached, self.cached_input),
            (minutes, self.cache_write),
            (hour, self.cache_write_1h),
            (usage.completion - reasoning, self.output),
            (reasoning, self.reasoning),
        ];
        let total: u128 = parts
            .iter()
            .map(|(tokens, price)| u128::from(*tokens) * u128::from(*price))
            .sum();
        let micros = total.div_ceil(1_000_000);
        u64::try_from(micros)
            .unwrap_or(u64::MAX)
            .min(wire::MAX_AMOUNT)
    }
}

/// How a table entry names models.
#[derive(Debug, Clone)]
pub enum ModelMatch {
    Exact(String),
    /// `gpt-4o*`: every name that starts so.
    Prefix(String),
    /// `regexp:^claude-3-5-sonnet`.
    Regex(Regex),
}

impl ModelMatch {
    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelMatch::Exact(m) => m == model,
            ModelMatch::Prefix(p) => model.starts_with(p.as_str()),
            ModelMatch::Regex(re) => re.is_match(model),
        }
    }
}

/// What a model missing from the table costs under a limit that counts money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownModel {
    /// The request is refused: a limit in money must never count something as free by
    /// accident.
    Deny,
    /// This price.
    Price(Price),
    /// Nothing (self-hosted models, say), on purpose.
    Free,
}

/// The price table.
#[derive(Debug, Clone)]
pub struct Prices {
    /// ISO 4217, e.g. `USD`.
    pub currency: String,
    /// First match wins.
    pub models: Vec<(ModelMatch, Price)>,
    pub unknown_model: UnknownModel,
    /// `service_tiers`: what an answer billed at a tier costs, as a multiple of its price in
    /// micro units (2,000,000: twice); a tier not listed costs the price.
    pub tiers: Vec<(String, u64)>,
}

impl Prices {
    fn listed(&self, model: &str) -> Option<Price> {
        self.models
            .iter()
            .find(|(m, _)| m.matches(model))
            .map(|(_, p)| *p)
    }

    /// The price of a request: the model the response names when the table lists it (a
    /// `gpt-4o` request answered by `gpt-4o-2024-08-06`), else the model the request names,
    /// else `unknown_model`. `None`: refuse (`unknown_model: deny`).
    pub fn price(
        &self,
        response_model: Option<&str>,
        request_model: Option<&str>,
    ) -> Option<Price> {
        let listed = response_model
            .and_then(|m| self.listed(m))
            .or_else(|| request_model.and_then(|m| self.listed(m)));
        match (listed, self.unknown_model) {
            (Some(p), _) => Some(p),
            (None, UnknownModel::Price(p)) => Some(p),
            (None, UnknownModel::Free) => Some(Price::default()),
            (None, UnknownModel::Deny) => None,
        }
    }
}

impl Prices {
    /// `cost` at the tier the response names (`priority`, `flex`…), rounded up. Each
    /// provider's spelling is read as one name: Vertex AI's `ON_DEMAND_PRIORITY` and Gemini's
    /// `SERVICE_TIER_PRIORITY` are `priority`, `ON_DEMAND` is `standard`; case is ignored.
    pub fn at_tier(&self, cost: u64, tier: Option<&str>) -> u64 {
        let Some(factor) = tier.and_then(|t| {
            let t = tier_name(t);
            self.tiers.iter().find(|(name, _)| tier_name(name) == t)
        }) else {
            return cost;
        };
        let scaled = (u128::from(cost) * u128::from(factor.1)).div_ceil(u128::from(MICROS));
        u64::try_from(scaled)
            .unwrap_or(u64::MAX)
            .min(wire::MAX_AMOUNT)
    }
}

/// A tier's name in one spelling: lower case, without Vertex AI's `on_demand_` and Gemini's
/// `service_tier_` prefixes (`ON_DEMAND` alone is `standard`).
fn tier_name(tier: &str) -> String {
    let t = tier.to_ascii_lowercase();
    if t == "on_demand" {
        return "standard".into();
    }
    ["on_demand_", "service_tier_"]
        .iter()
        .find_map(|p| t.strip_prefix(p))
        .map_or_else(|| t.clone(), str::to_string)
}

/// Micro units in one unit of currency.
pub const MICROS: u64 = 1_000_000;

/// A decimal amount (`"20.00"`, `"0.075"`, `"500"`) in micro units: at most six decimals, no
/// sign, no exponent, at most `max` micro units.
pub fn parse_amount(text: &str, max: u64) -> Result<u64, String> {
    let bad = || format!("\"{text}\" is not an amount; write it as a decimal such as \"20.00\"");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(fraction)
        || (text.contains('.') && fraction.is_empty())
    {
        return Err(bad());
    }
    if fraction.len() > 6 {
        return Err(format!(
            "\"{text}\" has more than six decimals (amounts are counted in millionths)"
        ));
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let mut micros_text = fraction.to_string();
    while micros_text.len() < 6 {
        micros_text.push('0');
    }
    let fraction: u64 = micros_text.parse().map_err(|_| bad())?;
    match whole
        .checked_mul(MICROS)
        .and_then(|w| w.checked_add(fraction))
    {
        Some(n) if n <= max => Ok(n),
        _ => Err(format!("\"{text}\" is larger than the maximum")),
    }
}

pub use wire::format_micros as format_amount;

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(input: &str, cached: &str, output: &str) -> Rates {
        let m = |s: &str| parse_amount(s, u64::MAX).unwrap();
        Rates {
            input: m(input),
            cached_input: m(cached),
            output: m(output),
            reasoning: m(output),
            cache_write: m(input),
            cache_write_1h: m(input),
        }
    }

    #[test]
    fn amounts_are_exact_decimals() {
        assert_eq!(parse_amount("20.00", u64::MAX), Ok(20_000_000));
        assert_eq!(parse_amount("0.075", u64::MAX), Ok(75_000));
        assert_eq!(parse_amount("500", u64::MAX), Ok(500_000_000));
        assert_eq!(parse_amount("0.000001", u64::MAX), Ok(1));
        for bad in [
            "",
            "-1",
            "1e3",
            "1.",
            ".5",
            "1,5",
            "1.0000001",
            " 1",
            "99999999999999999999",
        ] {
            assert!(parse_amount(bad, u64::MAX).is_err(), "{bad}");
        }
        assert!(parse_amount("2", 1_000_000).is_err());
        assert_eq!(format_amount(20_000_000), "20.00");
        assert_eq!(format_amount(75_000), "0.075");
        assert_eq!(format_amount(1), "0.000001");
        assert_eq!(format_amount(12_345_600_000), "12345.60");
    }

    /// Anthropic bills cache writes at 1.25× input (5 minutes) and 2× (an hour): 1,000 prompt
    /// tokens of which 300 written for 5 minutes and 200 for an hour, at $3 / M input.
    #[test]
    fn cache_writes_have_their_prices() {
        let p = Rates {
            cache_write: 3_750_000,
            cache_write_1h: 6_000_000,
            ..usd("3.00", "0.30", "15.00")
        };
        let u = Usage {
            prompt: 1_000,
            cache_write: 300,
            cache_write_1h: 200,
            ..Usage::default()
        };
        // 500 × 3 + 300 × 3.75 + 200 × 6 = 1,500 + 1,125 + 1,200 micro dollars.
        assert_eq!(p.cost(&u), 3_825);
        // Never more tokens priced than the prompt has.
        let odd = Usage {
            cache_write: 5_000,
            cache_write_1h: 5_000,
            ..u
        };
        assert_eq!(p.cost(&odd), 6_000);
    }

    /// Above 200,000 prompt tokens every token of the answer is billed at the long-context
    /// prices (Gemini 2.5 Pro: $1.25 / $10 below, $2.50 / $15 above).
    #[test]
    fn a_long_prompt_is_priced_at_the_long_context_prices() {
        let p = Price {
            rates: usd("1.25", "1.25", "10.00"),
            long_context: Some(LongContext {
                above_prompt_tokens: 200_000,
                rates: usd("2.50", "2.50", "15.00"),
            }),
        };
        let u = |prompt| Usage {
            prompt,
            completion: 1_000,
            total: prompt + 1_000,
            ..Usage::default()
        };
        // 200,000 × 1.25 + 1,000 × 10 micro dollars; one token more: every token above.
        assert_eq!(p.cost(&u(200_000)), 250_000 + 10_000);
        assert_eq!(p.cost(&u(200_001)), 500_003 + 15_000);
    }

    /// An answer billed at a tier costs a multiple of its price (OpenAI's priority and flex).
    #[test]
    fn service_tiers_multiply_the_cost() {
        let prices = Prices {
            currency: "USD".into(),
            models: Vec::new(),
            unknown_model: UnknownModel::Free,
            tiers: vec![("priority".into(), 2 * MICROS), ("flex".into(), MICROS / 2)],
        };
        assert_eq!(prices.at_tier(7_501, Some("priority")), 15_002);
        assert_eq!(prices.at_tier(7_501, Some("flex")), 3_751, "rounded up");
        assert_eq!(prices.at_tier(7_501, Some("default")), 7_501);
        assert_eq!(prices.at_tier(7_501, None), 7_501);
        // Vertex AI's and Gemini's spellings of the same tiers.
        assert_eq!(prices.at_tier(7_501, Some("ON_DEMAND_PRIORITY")), 15_002);
        assert_eq!(prices.at_tier(7_501, Some("SERVICE_TIER_FLEX")), 3_751);
        assert_eq!(prices.at_tier(7_501, Some("Priority")), 15_002);
        assert_eq!(prices.at_tier(7_501, Some("ON_DEMAND")), 7_501);
    }

    #[test]
    fn each_kind_of_token_has_its_price() {
        // gpt-4o: $2.50 in, $1.25 cached, $10 out per million.
        let p = usd("2.50", "1.25", "10.00");
        let u = |prompt, cached, completion, reasoning| Usage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            cached,
            reasoning,
            ..Usage::default()
        };
        // 1,000 prompt tokens and 500 completion: 2,500 + 5,000 micro dollars.
        assert_eq!(p.cost(&u(1_000, 0, 500, 0)), 7_500);
        // 400 of the prompt from the cache: 600 × 2.5 + 400 × 1.25 + 5,000.
        assert_eq!(p.cost(&u(1_000, 400, 500, 0)), 7_000);
        // Reasoning priced apart when it has its own price.
        let o1 = Rates {
            reasoning: 60_000_000,
            ..usd("15.00", "7.50", "60.00")
        };
        assert_eq!(o1.cost(&u(0, 0, 1_000, 800)), 60_000);
        let cheap_reasoning = Rates { reasoning: 0, ..o1 };
        assert_eq!(cheap_reasoning.cost(&u(0, 0, 1_000, 800)), 12_000);
        // A fraction of a micro unit rounds up, once per request.
        assert_eq!(usd("0.15", "0.15", "0.60").cost(&u(1, 0, 0, 0)), 1);
        assert_eq!(usd("0.15", "0.15", "0.60").cost(&u(10, 0, 0, 0)), 2);
        // A lying upstream's figures stay within the wire's bound.
        assert_eq!(p.cost(&u(u64::MAX, 0, u64::MAX, 0)), wire::MAX_AMOUNT);
    }

    #[test]
    fn the_answering_model_is_priced_first_then_the_asked_one_then_the_policy() {
        let table = |unknown_model| Prices {
            currency: "USD".into(),
            models: vec![
                (
                    ModelMatch::Exact("gpt-4o".into()),
                    usd("2.50", "1.25", "10.00").into(),
                ),
                (
                    ModelMatch::Prefix("gpt-4o-mini".into()),
                    usd("0.15", "0.075", "0.60").into(),
                ),
                (
                    ModelMatch::Regex(Regex::new("^gpt-4o-[0-9]{4}").unwrap()),
                    usd("5.00", "5.00", "15.00").into(),
                ),
            ],
            unknown_model,
            tiers: Vec::new(),
        };
        let t = table(UnknownModel::Deny);
        let input = |p: Option<Price>| p.map(|p| p.rates.input);
        assert_eq!(
            input(t.price(Some("gpt-4o-2024-05-13"), Some("gpt-4o"))),
            Some(5_000_000)
        );
        assert_eq!(
            input(t.price(Some("gpt-4o-mini-2024-07-18"), None)),
            Some(150_000)
        );
        assert_eq!(
            input(t.price(Some("unlisted"), Some("gpt-4o"))),
            Some(2_500_000)
        );
        assert_eq!(input(t.price(None, Some("gpt-4o"))), Some(2_500_000));
        assert_eq!(t.price(None, Some("llama")), None);
        assert_eq!(t.price(None, None), None);
        assert_eq!(
            table(UnknownModel::Free).price(None, Some("llama")),
            Some(Price::default())
        );
        let flat = Price::from(usd("1", "1", "1"));
        assert_eq!(
            table(UnknownModel::Price(flat)).price(None, Some("llama")),
            Some(flat)
        );
    }
}
