//! What a check reserves: the output cap a request asks for (or a fixed figure), clamped to
//! what could ever be admitted, so no request body can produce a reserve the service refuses
//! or one that buries a budget in debt.

use crate::body::{Api, BodyFacts};
use crate::config::{Count, Protocol, Reserve};
use crate::limits::Descriptor;
use crate::pricing::Price;
use crate::usage::Usage;

/// How requests reserve: `reserve.tokens`, `reserve.max` and `reserve.default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub wanted: Reserve,
    pub max: u64,
    pub default: u64,
}

/// What a check reserves for a request, and the output each choice may produce within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    /// Tokens the check asks the service to take.
    pub tokens: u64,
    /// Output tokens per choice the reservation pays for (what `reserve.write_cap` writes into
    /// the request); 0 without a reservation.
    pub per_choice: u64,
}

/// The tokens a check reserves for a request with `descriptors`.
///
/// * `Reserve::Tokens(n)`: `n`. `Reserve::MaxTokens`: the body's output cap (in the fields its
///   API reads: `body` is the facts and the API of the request's path), or
///   `rule.default` when it states none or cannot be read (a request never opts out of its
///   reservation by leaving the cap out), times the choices it asks for (`n`, `best_of`,
///   `candidateCount`: each is an answer the upstream bills).
/// * Never more than `rule.max` (at most the wire's token bound), nor, when every descriptor
///   carries its rates, than the largest budget among them: a larger reserve could not be
///   admitted any sooner, and would only deepen the debt.
/// * The protocol's own rule last ([`crate::protocol::Wire::reservation`]: the ASM protocol
///   has no reservations, the RLS API counts every check as at least one hit).
pub fn reserve(
    rule: Rule,
    protocol: Protocol,
    body: Option<(&BodyFacts, Api)>,
    descriptors: &[Descriptor],
) -> Reservation {
    let asked = output_cap(rule, body);
    let bound = largest_budget(descriptors, false).unwrap_or(u64::MAX);
    let tokens = protocol.wire().reservation(asked.min(bound));
    let choices = choices(rule, body);
    let per_choice = if tokens == 0 {
        0
    } else {
        (tokens / choices).max(1)
    };
    Reservation { tokens, per_choice }
}

/// The outputs a reservation covers: one for a fixed reserve, else the request's choices.
fn choices(rule: Rule, body: Option<(&BodyFacts, Api)>) -> u64 {
    match rule.wanted {
        Reserve::Tokens(_) => 1,
        Reserve::MaxTokens => body.map_or(1, |(facts, _)| facts.choices()),
    }
}

/// The output tokens a request asks for, as `reserve` configures it, at most `rule.max`.
fn output_cap(rule: Rule, body: Option<(&BodyFacts, Api)>) -> u64 {
    let asked = match rule.wanted {
        Reserve::Tokens(n) => n,
        Reserve::MaxTokens => body
            .and_then(|(facts, api)| facts.output_token_cap(api))
            .unwrap_or(rule.default)
            .saturating_mul(choices(rule, body)),
    };
    asked.min(rule.max).min(wire::MAX_AMOUNT)
}

/// The largest budget among the descriptors in money (`money`) or in tokens, when every one
/// of them carries its rates (a larger reserve could not be admitted any sooner, and would
/// only deepen the debt). Shadow limits never decide, so they bound nothing.
fn largest_budget(descriptors: &[Descriptor], money: bool) -> Option<u64> {
    let of_unit = || {
        descriptors
            .iter()
            .filter(move |d| !d.shadow && d.currency.is_some() == money)
    };
    if of_unit().any(|d| d.rates.is_empty()) {
        return None;
    }
    of_unit()
        .flat_map(|d| d.rates.iter().map(|r| r.budget))
        .max()
}

/// What a check reserves in money (micro units) when a budget in money applies: the output
/// cap (as [`reserve`] takes it) at the output price plus the prompt, estimated from the request body's size, at the
/// input price; nothing without a `reserve`. At most the largest budget in money.
pub fn reserve_cost(
    price: &Price,
    rule: Rule,
    body: Option<(&BodyFacts, Api)>,
    request_bytes: Option<u64>,
    descriptors: &[Descriptor],
) -> u64 {
    full_cost(price, rule, body, request_bytes)
        .min(largest_budget(descriptors, true).unwrap_or(u64::MAX))
}

/// What the request may cost at most (micro units): the prompt's estimate and the whole output
/// cap at their prices, however large; nothing without a `reserve`.
pub fn full_cost(
    price: &Price,
    rule: Rule,
    body: Option<(&BodyFacts, Api)>,
    request_bytes: Option<u64>,
) -> u64 {
    if rule.wanted == Reserve::Tokens(0) {
        return 0;
    }
    let prompt = prompt_tokens(request_bytes);
    let completion = output_cap(rule, body);
    price.cost(&Usage {
        prompt,
        completion,
        total: prompt.saturating_add(completion),
        ..Usage::default()
    })
}

/// How a trimmed check's grant turns back into the output cap written into the request
/// (`reserve.trim`). A trimmed reservation pays for the whole request: the prompt's estimated
/// share (`fixed`) plus the output at the tokens `count` charges per output token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimPlan {
    /// The prompt's share of the reservation, in charged tokens.
    pub fixed: u64,
    /// Charged tokens per output token (1 under `total` and `completion`).
    per_output: f64,
    choices: u64,
}

/// A trimmed check: its plan, the tokens it reserves and the least it accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trimmed {
    pub plan: TrimPlan,
    pub tokens: u64,
    pub min: u64,
}

/// The most output a trimmed check reserves: far above what any model produces, far below
/// where a price times it could reach the wire's bound (which would no longer price a grant in
/// proportion).
pub const MAX_TRIMMED_OUTPUT: u64 = 1_000_000_000;

/// The trimmed check for a request (`body`, read, on a path whose API has a cap field the
/// plugin can write) whose prompt is estimated at `prompt` tokens, reserving its whole output
/// cap over its choices (up to [`MAX_TRIMMED_OUTPUT`], as [`full_cost`] prices it), served with
/// at least `min_per_choice` output tokens per choice; `None` when there is nothing to trim (no
/// body read, no cap to write, output that costs nothing, a cap already at the least).
pub fn trim(
    rule: Rule,
    body: Option<(&BodyFacts, Api)>,
    count: Count,
    prompt: u64,
    min_per_choice: u64,
) -> Option<Trimmed> {
    let (prompt_weight, per_output) = match count {
        Count::Total => (1.0, 1.0),
        Count::Completion => (0.0, 1.0),
        Count::Prompt => return None,
        Count::Weighted {
            prompt, completion, ..
        } => (prompt, completion),
    };
    let (_, api) = body?;
    let output = output_cap(rule, body).min(MAX_TRIMMED_OUTPUT);
    if api == Api::Other || output == 0 || per_output <= 0.0 {
        return None;
    }
    let plan = TrimPlan {
        fixed: (prompt as f64 * prompt_weight).ceil() as u64,
        per_output,
        choices: choices(rule, body),
    };
    let fixed = plan.fixed;
    let tokens = fixed.saturating_add(plan.charged(output));
    let min = fixed.saturating_add(plan.charged(min_per_choice.saturating_mul(plan.choices)));
    (min < tokens).then_some(Trimmed { plan, tokens, min })
}

impl TrimPlan {
    /// The output cap per choice a grant of `tokens` pays for.
    pub fn cap(&self, tokens: u64) -> u64 {
        let room = tokens.saturating_sub(self.fixed);
        let output = room as f64 / self.per_output;
        let mut cap = (output.floor() as u64 / self.choices).max(1);
        // The division may land above what the weight, rounded up, charges within the room.
        while cap > 1 && self.charged(cap.saturating_mul(self.choices)) > room {
            cap -= 1;
        }
        cap
    }

    /// The tokens `output` tokens are charged.
    fn charged(&self, output: u64) -> u64 {
        (output as f64 * self.per_output).ceil() as u64
    }
}

/// What the prompt alone costs in money (micro units), estimated from the request body's size:
/// the part of a money reservation that a trimmed cap does not shrink.
pub fn prompt_cost(price: &Price, request_bytes: Option<u64>) -> u64 {
    let prompt = prompt_tokens(request_bytes);
    price.cost(&Usage {
        prompt,
        total: prompt,
        ..Usage::default()
    })
}

/// The prompt's tokens, estimated from the request body's size.
pub fn prompt_tokens(request_bytes: Option<u64>) -> u64 {
    request_bytes
        .unwrap_or(0)
        .div_ceil(crate::usage::BYTES_PER_TOKEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;
    use crate::pricing::Rates;

    fn d(rates: &[u64]) -> Descriptor {
        Descriptor {
            limit: "l".into(),
            value: "v".into(),
            rates: rates
                .iter()
                .map(|&budget| Rate {
                    budget,
                    window_s: 60,
                    calendar: None,
                })
                .collect(),
            shared: false,
            currency: None,
            shadow: false,
            alerts: Vec::new(),
        }
    }

    fn facts(body: &str) -> BodyFacts {
        BodyFacts::parse(body.as_bytes()).unwrap_or_default()
    }

    fn rule(wanted: Reserve, max: u64) -> Rule {
        Rule {
            wanted,
            max,
            default: 4096,
        }
    }

    fn tokens(wanted: Reserve, max: u64, body: Option<&BodyFacts>, ds: &[Descriptor]) -> u64 {
        let body = body.map(|f| (f, Api::Other));
        reserve(rule(wanted, max), Protocol::V1, body, ds).tokens
    }

    #[test]
    fn a_reserve_in_money_prices_the_output_cap_and_the_prompt() {
        let price = Price::from(Rates {
            input: 2_500_000,
            cached_input: 1_250_000,
            output: 10_000_000,
            reasoning: 10_000_000,
            cache_write: 2_500_000,
            cache_write_1h: 2_500_000,
        });
        let mut money = d(&[20_000]);
        money.currency = Some("USD".into());
        let ds = [d(&[1_000]), money];
        let body = facts(r#"{"max_tokens": 500}"#);
        // 500 output tokens at $10/M and 400 bytes of prompt (100 tokens) at $2.50/M.
        let cost = |wanted, max, body: Option<&BodyFacts>| {
            let body = body.map(|f| (f, Api::Other));
            reserve_cost(&price, rule(wanted, max), body, Some(400), &ds)
        };
        assert_eq!(cost(Reserve::MaxTokens, u64::MAX, Some(&body)), 5_000 + 250);
        assert_eq!(cost(Reserve::Tokens(100), u64::MAX, None), 1_000 + 250);
        // `reserve.max` caps the output priced; no reserve configured, nothing reserved.
        assert_eq!(cost(Reserve::MaxTokens, 10, Some(&body)), 100 + 250);
        assert_eq!(cost(Reserve::Tokens(0), u64::MAX, Some(&body)), 0);
        // Never more than the largest budget in money; the token bound ignores money.
        let huge = facts(r#"{"max_tokens": 100000000}"#);
        assert_eq!(cost(Reserve::MaxTokens, u64::MAX, Some(&huge)), 20_000);
        assert_eq!(
            tokens(Reserve::MaxTokens, u64::MAX, Some(&huge), &ds),
            1_000
        );
    }

    /// A trimmed check reserves the prompt and the whole cap (however large), accepts down to
    /// the prompt and `min` per choice, and turns a grant back into a cap per choice.
    #[test]
    fn trims_reserve_the_whole_request_and_give_back_a_cap() {
        let body = BodyFacts::parse(br#"{"max_tokens": 1000, "n": 2}"#).unwrap();
        let rule = Rule {
            wanted: Reserve::MaxTokens,
            max: wire::MAX_AMOUNT,
            default: 4096,
        };
        let t = trim(rule, Some((&body, Api::Chat)), Count::Total, 100, 50).unwrap();
        assert_eq!((t.tokens, t.min, t.plan.fixed), (2100, 200, 100));
        assert_eq!(t.plan.cap(700), 300);
        assert_eq!(t.plan.cap(t.min), 50);
        // Only the output counts: no prompt share.
        let t = trim(rule, Some((&body, Api::Chat)), Count::Completion, 100, 50).unwrap();
        assert_eq!((t.tokens, t.min), (2000, 100));
        // A weight that does not divide: the cap is never charged past the grant.
        let weighted = Count::Weighted {
            prompt: 1.0,
            cached_prompt: 1.0,
            completion: 1.1,
        };
        let t = trim(rule, Some((&body, Api::Chat)), weighted, 0, 1).unwrap();
        for grant in 2..5000u64 {
            let cap = t.plan.cap(grant);
            assert!(
                cap == 1 || ((cap * 2) as f64 * 1.1).ceil() as u64 <= grant,
                "{grant}"
            );
        }
        // Nothing to trim: no body read, a path without a cap field, a prompt-only count, or a
        // cap already at the least.
        assert_eq!(trim(rule, None, Count::Total, 100, 50), None);
        assert_eq!(
            trim(rule, Some((&body, Api::Other)), Count::Total, 100, 50),
            None
        );
        assert_eq!(
            trim(rule, Some((&body, Api::Chat)), Count::Prompt, 100, 50),
            None
        );
        assert_eq!(
            trim(rule, Some((&body, Api::Chat)), Count::Total, 0, 1000),
            None
        );
    }

    #[test]
    fn every_output_cap_a_client_can_write_yields_a_valid_reserve() {
        let ds = [d(&[1000, 5000]), d(&[200])];
        let r = |body: &str| tokens(Reserve::MaxTokens, u64::MAX, Some(&facts(body)), &ds);
        for (body, want) in [
            (r#"{"max_tokens": 100}"#, 100),
            (r#"{"max_tokens": 100000000000000000}"#, 5000),
            (r#"{"max_completion_tokens": 100000000000000000}"#, 5000),
            (r#"{"max_output_tokens": 1e300}"#, 5000),
            (r#"{"generationConfig": {"maxOutputTokens": 7000}}"#, 5000),
            (r#"{"generation_config": {"max_output_tokens": 70}}"#, 70),
            (r#"{"max_tokens": 10, "max_completion_tokens": 300}"#, 300),
            (r#"{"max_tokens": -5}"#, 4096),
            (r#"{"max_tokens": 10.2}"#, 11),
            (r#"{"max_tokens": "250"}"#, 250),
            // No cap stated: `reserve.default`, never nothing.
            (r#"{"max_tokens": "lots"}"#, 4096),
            (r#"{"max_tokens": null}"#, 4096),
            (r#"{"max_tokens": [1]}"#, 4096),
            (r#"{"max_tokens": NaN}"#, 4096),
            (r#"{"max_tokens": 99999999999999999999999999}"#, 5000),
            (r#"{}"#, 4096),
            // Every choice is an answer: the cap times `n`, `best_of` or `candidateCount`.
            (r#"{"max_tokens": 100, "n": 3}"#, 300),
            (r#"{"max_tokens": 100, "n": 2, "best_of": 4}"#, 400),
            (
                r#"{"generationConfig": {"maxOutputTokens": 100, "candidateCount": 2}}"#,
                200,
            ),
            (r#"{"max_tokens": 100, "n": 1000}"#, 5000),
        ] {
            assert_eq!(r(body), want, "{body}");
        }
        // A body that cannot be read reserves the default too.
        assert_eq!(tokens(Reserve::MaxTokens, u64::MAX, None, &ds), 4096);
    }

    #[test]
    fn the_bound_is_the_configured_max_or_the_largest_budget() {
        let huge = facts(r#"{"max_tokens": 100000000000000000}"#);
        let plugin_owned = [d(&[1000])];
        let service_owned = [d(&[])];
        let mixed = [d(&[1000]), d(&[])];
        let r = |max, ds: &[Descriptor]| tokens(Reserve::MaxTokens, max, Some(&huge), ds);
        assert_eq!(r(u64::MAX, &plugin_owned), 1000);
        assert_eq!(r(300, &plugin_owned), 300);
        assert_eq!(r(u64::MAX, &service_owned), wire::MAX_AMOUNT);
        assert_eq!(r(4096, &service_owned), 4096);
        assert_eq!(
            r(u64::MAX, &mixed),
            wire::MAX_AMOUNT,
            "a bucket may be larger"
        );
        assert_eq!(
            tokens(Reserve::Tokens(50_000), u64::MAX, None, &plugin_owned),
            1000
        );
        // A shadow limit bounds nothing: the enforced limit's budget is the bound.
        let shadow = Descriptor {
            shadow: true,
            ..d(&[1_000_000])
        };
        assert_eq!(r(u64::MAX, &[d(&[1000]), shadow.clone()]), 1000);
        assert_eq!(
            r(
                u64::MAX,
                &[
                    d(&[1000]),
                    Descriptor {
                        rates: vec![],
                        ..shadow
                    }
                ]
            ),
            1000
        );
        // The output each choice may produce within the reservation.
        let three = facts(r#"{"max_tokens": 500, "n": 3}"#);
        let r = reserve(
            rule(Reserve::MaxTokens, u64::MAX),
            Protocol::V1,
            Some((&three, Api::Chat)),
            &plugin_owned,
        );
        assert_eq!((r.tokens, r.per_choice), (1000, 333));
    }

    #[test]
    fn reservations_per_protocol() {
        let reservation = |p: Protocol, wanted| p.wire().reservation(wanted);
        assert_eq!(reservation(Protocol::V1, 0), 0);
        assert_eq!(reservation(Protocol::V1, 70), 70);
        assert_eq!(reservation(Protocol::Asm, 70), 0);
        assert_eq!(reservation(Protocol::EnvoyRls, 0), 1);
        assert_eq!(reservation(Protocol::EnvoyRls, 70), 70);
    }
}
