//! The options every shape accepts beside its own fields (`usage`, `reserve`, `deny`,
//! `client_ip`, …), read from the same object in a pass of their own and applied to the model
//! over its defaults.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::de::Path;
use super::values::{Amount, Currency, HeaderName, Pattern, Status, Whole};
use super::*;
use crate::client_ip::{ClientIpSource, Prefixes};
use crate::pricing::{LongContext, ModelMatch, Price, Prices, Rates, UnknownModel};
use wire::MAX_AMOUNT;

/// The shared options; every one is optional and has the default [`Config::new`] gives.
#[derive(Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Options {
    /// Which tokens a request is charged, and what a response without usage costs.
    usage: Option<UsageSpec>,
    /// Tokens taken from every budget at admission, before the usage is known.
    reserve: Option<ReserveSpec>,
    /// Ask streaming upstreams for a usage chunk (`stream_options.include_usage`); `true`.
    inject_stream_usage: Option<bool>,
    /// End a stream, in its provider's own shape, once what it would be charged passes what
    /// its budget had for it at admission; `false` (always on under `reserve.trim`).
    stream_cutoff: Option<bool>,
    /// How long the upstream of a stream the plugin ended may go on, unforwarded, before the
    /// stream is reset (a client that hangs up at the end resets it sooner); 5000.
    stream_drain_ms: Option<Whole<0, 600_000>>,
    /// The reply to a denied request.
    deny: Option<DenySpec>,
    /// `X-RateLimit-*` headers on every limited response; `true`.
    quota_headers: Option<bool>,
    /// Where the client address (`{{source.ip}}`) comes from.
    client_ip: Option<ClientIpSpec>,
    /// The header the auth layer sets to the consumer's name (`x-mse-consumer`).
    consumer_header: Option<HeaderName>,
    /// The most of a request body read for the model and `max_tokens` (1 MiB).
    max_request_body_bytes: Option<Whole<1, { 64 * 1024 * 1024 }>>,
    /// Distinct keys waiting in the VM's report queue before new ones are dropped.
    max_pending_reports: Option<Whole<1, 1_000_000>>,
    /// What each model costs, for limits with `"unit": "cost"`.
    prices: Option<PricesSpec>,
}

impl Options {
    /// Whether `deny` was given (the Higress shape has its own words for the denial).
    pub fn has_deny(&self) -> bool {
        self.deny.is_some()
    }

    pub fn has_quota_headers(&self) -> bool {
        self.quota_headers.is_some()
    }

    /// Sets the options given on `config`, keeping its defaults for the others.
    pub fn apply(self, path: &Path, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(u) = self.usage {
            config.count = u.count.map_or(Count::Total, CountSpec::into_count);
            config.on_missing = match u.on_missing {
                None | Some(OnMissingSpec::Estimate) => OnMissing::Estimate,
                Some(OnMissingSpec::Zero) => OnMissing::Zero,
            };
        }
        if let Some(r) = self.reserve {
            config.reserve = match r.tokens {
                None => Reserve::Tokens(0),
                Some(ReserveTokens(reserve)) => reserve,
            };
            // Not set: `derive` gives the protocol's default.
            config.reserve_max = r.max.map_or(0, |m| m.0);
            if let Some(d) = r.default {
                config.reserve_default = d.0;
            }
            config.write_cap = r.write_cap.unwrap_or(false);
            let at = path.field("reserve");
            if r.min.is_some() && r.trim != Some(true) {
                return Err(at.field("min").error("is used only with \"trim\": true"));
            }
            if r.trim == Some(true) {
                if config.reserve != Reserve::MaxTokens {
                    return Err(at.field("trim").error(
                        "needs \"tokens\": \"max_tokens\" (a cap to trim is the request's own)",
                    ));
                }
                if config.service.protocol != Protocol::V1 {
                    return Err(at.field("trim").error(
                        "needs the v1 protocol: only this project's service grants part of a reserve",
                    ));
                }
                config.trim_min = Some(r.min.map_or(DEFAULT_TRIM_MIN, |m| m.0));
            }
        }
        // A lease admits requests by what they reserve: without a reservation it bounds none.
        if config.service.leases && config.reserve == Reserve::Tokens(0) {
            return Err(path.field("service").field("admission").error(
                "\"lease\" needs a reservation (`reserve.tokens`: a number or \"max_tokens\"): a lease admits requests by what they reserve",
            ));
        }
        if let Some(inject) = self.inject_stream_usage {
            config.inject_stream_usage = inject;
        }
        if let Some(c) = self.stream_cutoff {
            config.stream_cutoff = c;
        }
        if let Some(d) = self.stream_drain_ms {
            config.stream_drain_ms = d.0;
        }
        if let Some(d) = self.deny {
            config.deny = d.into_deny(&path.field("deny"))?;
        }
        if let Some(q) = self.quota_headers {
            config.quota_headers = q;
        }
        if let Some(c) = self.client_ip {
            let at = path.field("client_ip");
            config.client_ip_prefixes = Prefixes {
                v4: c.ipv4_prefix.map_or(32, |p| p.0 as u8),
                v6: c.ipv6_prefix.map_or(64, |p| p.0 as u8),
            };
            config.client_ip = c.into_source(&at)?;
        }
        if let Some(h) = self.consumer_header {
            config.consumer_header = h.0;
        }
        if let Some(n) = self.max_request_body_bytes {
            config.max_request_body_bytes = n.0 as usize;
        }
        if let Some(n) = self.max_pending_reports {
            config.max_pending_reports = n.0 as usize;
        }
        if let Some(p) = self.prices {
            config.prices = Some(p.into_prices(&path.field("prices"))?);
        }
        // Limits in money count in the table's currency; they need one, and protocol v1.
        let currency = config.prices.as_ref().map(|p| p.currency.clone());
        let protocol = config.service.protocol;
        for (i, limit) in config.limits.iter_mut().enumerate() {
            if limit.shadow && protocol != Protocol::V1 {
                return Err(path.field("limits").index(i).field("mode").error(
                    "\"shadow\" needs protocol \"v1\": the asm answer names no limit, and under envoy-rls the engine decides (envoyproxy/ratelimit has `shadow_mode: true` on a descriptor in its own configuration; Limitador has none)",
                ));
            }
            if limit.shadow && matches!(limit.rates, crate::limits::LimitRates::ServiceOwned) {
                return Err(path.field("limits").index(i).field("mode").error(
                    "\"shadow\" needs the limit's own rates (`tokens` and `window`, `rates` or `values`): the service's rules decide a limit without them",
                ));
            }
            if !limit.alerts.is_empty() && protocol != Protocol::V1 {
                return Err(path.field("limits").index(i).field("alerts").error(
                    "needs protocol \"v1\": alerts are raised by the llm-token-ratelimit service, which the asm and envoy-rls protocols do not reach with a limit's thresholds",
                ));
            }
            if !limit.alerts.is_empty()
                && matches!(limit.rates, crate::limits::LimitRates::ServiceOwned)
            {
                return Err(path.field("limits").index(i).field("alerts").error(
                    "needs the limit's own rates (`tokens` and `window`, `rates` or `values`): alerts are fractions of a budget the limit states",
                ));
            }
            if limit.currency.is_none() {
                continue;
            }
            let at = path.field("limits").index(i).field("unit");
            match (&currency, protocol) {
                (None, _) => {
                    return Err(at.error(
                        "\"cost\" needs a `prices` table: {\"currency\": \"USD\", \"models\": [{\"model\": \"gpt-4o\", \"input\": \"2.50\", \"output\": \"10.00\"}]}",
                    ))
                }
                (Some(_), p) if p != Protocol::V1 => {
                    return Err(at.error(
                        "\"cost\" needs protocol \"v1\": the other protocols count tokens only",
                    ))
                }
                (Some(c), _) => limit.currency = Some(c.clone()),
            }
        }
        Ok(())
    }
}

/// The price table: prices per million tokens, in one currency.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct PricesSpec {
    /// ISO 4217, e.g. `USD`: the unit of every price and of every budget in money.
    currency: Currency,
    /// The first entry whose `model` fits is the price; `model` is an exact name, a prefix
    /// ending in `*` (`gpt-4o*`) or `regexp:<re>`.
    models: Vec<PriceSpec>,
    /// A model the table does not list: `"deny"` (the default: the request is refused),
    /// `"free"`, or `{"price": {"input": ..., "output": ...}}`.
    unknown_model: Option<UnknownModelSpec>,
    /// What an answer costs at a service tier the response names, as a multiple of its price:
    /// `{"priority": "2", "flex": "0.5"}`. A tier not listed costs the price.
    service_tiers: Option<BTreeMap<String, Amount>>,
}

/// Prices per million tokens of one model (or, under `unknown_model`, of any other).
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct PriceSpec {
    /// In `models`: which models this price is for.
    model: Option<String>,
    input: Amount,
    /// Prompt tokens read from the provider's cache (`input` unless given).
    cached_input: Option<Amount>,
    output: Amount,
    /// Reasoning tokens (`output` unless given).
    reasoning: Option<Amount>,
    /// Prompt tokens written to the provider's cache for 5 minutes (1.25 × `input` unless
    /// given, as Anthropic bills them).
    cache_write: Option<Amount>,
    /// Prompt tokens written to the cache for an hour (2 × `input` unless given).
    cache_write_1h: Option<Amount>,
    /// Other prices for an answer whose prompt is larger than `above_prompt_tokens` (Gemini's
    /// and Anthropic's long-context prices apply to every token of such a request).
    long_context: Option<LongContextSpec>,
}

/// `long_context`: prices as in an entry (the same defaults, from these prices), and the
/// prompt size above which they apply.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct LongContextSpec {
    above_prompt_tokens: Whole<1, MAX_AMOUNT>,
    input: Amount,
    cached_input: Option<Amount>,
    output: Amount,
    reasoning: Option<Amount>,
    cache_write: Option<Amount>,
    cache_write_1h: Option<Amount>,
}

/// The rates of an entry (or of its long-context part) with their defaults: cached input at
/// the input price, reasoning at the output price, cache writes at 1.25× and 2× input.
fn rates(
    input: Amount,
    cached_input: Option<Amount>,
    output: Amount,
    reasoning: Option<Amount>,
    cache_write: Option<Amount>,
    cache_write_1h: Option<Amount>,
) -> Rates {
    let i = input.0;
    Rates {
        input: i,
        cached_input: cached_input.unwrap_or(input).0,
        output: output.0,
        reasoning: reasoning.unwrap_or(output).0,
        cache_write: cache_write.map_or(i.saturating_add(i / 4), |a| a.0),
        cache_write_1h: cache_write_1h.map_or(i.saturating_mul(2), |a| a.0),
    }
}

impl PriceSpec {
    fn price(&self) -> Price {
        let long_context = self.long_context.as_ref().map(|l| LongContext {
            above_prompt_tokens: l.above_prompt_tokens.0,
            rates: rates(
                l.input,
                l.cached_input,
                l.output,
                l.reasoning,
                l.cache_write,
                l.cache_write_1h,
            ),
        });
        Price {
            rates: rates(
                self.input,
                self.cached_input,
                self.output,
                self.reasoning,
                self.cache_write,
                self.cache_write_1h,
            ),
            long_context,
        }
    }
}

enum UnknownModelSpec {
    Deny,
    Free,
    Price(PriceSpec),
}

/// `{"price": {...}}` under `unknown_model`.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct UnknownPrice {
    price: PriceSpec,
}

impl<'de> Deserialize<'de> for UnknownModelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UnknownModelSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"deny\", \"free\" or {\"price\": {...}}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<UnknownModelSpec, E> {
                match s {
                    "deny" => Ok(UnknownModelSpec::Deny),
                    "free" => Ok(UnknownModelSpec::Free),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UnknownModelSpec, A::Error> {
                UnknownPrice::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|u| UnknownModelSpec::Price(u.price))
            }
        }
        d.deserialize_any(V)
    }
}

impl PricesSpec {
    fn into_prices(self, path: &Path) -> Result<Prices, ConfigError> {
        let models = self
            .models
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = path.field("models").index(i).field("model");
                let matcher = match p.model.as_deref() {
                    None | Some("") => return Err(at.error("is required")),
                    Some(m) => match (m.strip_prefix("regexp:"), m.strip_suffix('*')) {
                        (Some(re), _) => {
                            ModelMatch::Regex(Pattern::compile(re).map_err(|e| at.error(e))?)
                        }
                        (None, Some(prefix)) => ModelMatch::Prefix(prefix.to_string()),
                        (None, None) => ModelMatch::Exact(m.to_string()),
                    },
                };
                Ok((matcher, p.price()))
            })
            .collect::<Result<_, _>>()?;
        let unknown_model = match self.unknown_model {
            None | Some(UnknownModelSpec::Deny) => UnknownModel::Deny,
            Some(UnknownModelSpec::Free) => UnknownModel::Free,
            Some(UnknownModelSpec::Price(p)) if p.model.is_some() => {
                return Err(path
                    .field("unknown_model")
                    .field("price")
                    .field("model")
                    .error(
                    "names no model here: this price is for every model the table does not list",
                ))
            }
            Some(UnknownModelSpec::Price(p)) => UnknownModel::Price(p.price()),
        };
        let tiers = self
            .service_tiers
            .unwrap_or_default()
            .into_iter()
            .map(|(tier, factor)| (tier, factor.0))
            .collect();
        Ok(Prices {
            currency: self.currency.0,
            models,
            unknown_model,
            tiers,
        })
    }
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct UsageSpec {
    /// `"total"` (default), `"prompt"`, `"completion"` or weights per kind of token.
    count: Option<CountSpec>,
    /// What a successful response without usage is charged: an `estimate` (default) or `zero`.
    on_missing: Option<OnMissingSpec>,
}

#[derive(Deserialize, Clone, Copy)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
enum OnMissingSpec {
    Estimate,
    Zero,
}

/// `"total"`, `"prompt"`, `"completion"`, or `{"prompt": w, "cached_prompt": w, "completion": w}`.
enum CountSpec {
    Named(Count),
    Weighted(Weights),
}

impl CountSpec {
    fn into_count(self) -> Count {
        match self {
            CountSpec::Named(c) => c,
            CountSpec::Weighted(w) => {
                let prompt = w.prompt.map_or(0.0, |w| w.0);
                Count::Weighted {
                    prompt,
                    cached_prompt: w.cached_prompt.map_or(prompt, |w| w.0),
                    completion: w.completion.map_or(0.0, |w| w.0),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for CountSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CountSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an object")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CountSpec, E> {
                match s {
                    "total" => Ok(CountSpec::Named(Count::Total)),
                    "prompt" => Ok(CountSpec::Named(Count::Prompt)),
                    "completion" => Ok(CountSpec::Named(Count::Completion)),
                    other => Err(E::custom(format!(
                        "\"{other}\" is not one of \"total\", \"prompt\", \"completion\" or {{\"prompt\": w, \"cached_prompt\": w, \"completion\": w}}"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CountSpec, A::Error> {
                Weights::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(CountSpec::Weighted)
            }
        }
        d.deserialize_any(V)
    }
}

/// What each kind of token weighs; cached prompt tokens weigh as `prompt` unless given.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct Weights {
    prompt: Option<Weight>,
    cached_prompt: Option<Weight>,
    completion: Option<Weight>,
}

/// A weight from 0 to 1,000,000.
struct Weight(f64);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Weight, E> {
                if f.is_finite() && (0.0..=1_000_000.0).contains(&f) {
                    Ok(Weight(f))
                } else {
                    Err(E::custom("must be a weight between 0 and 1000000"))
                }
            }
        }
        d.deserialize_f64(V)
    }
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct ReserveSpec {
    /// A number of tokens, or `"max_tokens"`: the request's own output cap.
    tokens: Option<ReserveTokens>,
    /// The largest reserve one check may ask, whatever the request says (the wire's bound;
    /// 4096 under envoy-rls).
    max: Option<Whole<1, MAX_AMOUNT>>,
    /// What a request that states no output cap, or whose body cannot be read, reserves under
    /// `"max_tokens"` (4096).
    default: Option<Whole<1, MAX_AMOUNT>>,
    /// Write the reserved cap into the request, in the field its API reads (`false`).
    write_cap: Option<bool>,
    /// Serve within the budget: when the request's cap does not fit, the service grants the
    /// largest cap of at least `min` that does, and the plugin writes it into the request
    /// (`false`; needs `"tokens": "max_tokens"` and protocol v1).
    trim: Option<bool>,
    /// The least output cap (per choice) worth serving under `trim` (256).
    min: Option<Whole<1, MAX_AMOUNT>>,
}

struct ReserveTokens(Reserve);

impl<'de> Deserialize<'de> for ReserveTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ReserveTokens;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of tokens or \"max_tokens\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ReserveTokens, E> {
                match s {
                    "max_tokens" => Ok(ReserveTokens(Reserve::MaxTokens)),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ReserveTokens, E> {
                if n > MAX_AMOUNT {
                    return Err(E::custom(format!(
                        "{n} is larger than the maximum {MAX_AMOUNT}"
                    )));
                }
                Ok(ReserveTokens(Reserve::Tokens(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ReserveTokens, E> {
                Err(E::custom(format!(
                    "expected a non-negative whole number, found {n}"
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<ReserveTokens, E> {
                Err(E::custom(format!(
                    "expected a non-negative whole number, found {}",
                    super::values::decimal(n)
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct DenySpec {
    /// 429 unless given.
    status: Option<Status>,
    /// The body; absent: an OpenAI-style error JSON.
    body: Option<String>,
    /// Extra headers on the denial.
    headers: Option<BTreeMap<String, String>>,
}

impl DenySpec {
    fn into_deny(self, path: &Path) -> Result<DenyConfig, ConfigError> {
        let headers = self
            .headers
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| {
                let at = path.field("headers").field(&name);
                if !HeaderName::valid(&name) || name.starts_with(':') {
                    return Err(at.error("is not a valid header name"));
                }
                if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(at.error("must not contain CR, LF or NUL"));
                }
                Ok((name.to_ascii_lowercase(), value))
            })
            .collect::<Result<_, _>>()?;
        Ok(DenyConfig {
            status: self.status.map_or(429, |s| s.0),
            body: self.body,
            headers,
        })
    }
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct ClientIpSpec {
    /// Only `"remote"`: the address of the connection's peer as Envoy sees it (the default).
    source: Option<String>,
    /// A header with a list of addresses, e.g. `x-forwarded-for`.
    header: Option<HeaderName>,
    /// With `header`: which entry from the right is the client's (1: the right-most).
    trusted_hops: Option<Whole<1, 64>>,
    /// The leading bits of an IPv4 address that are one client in keys (32: each address).
    ipv4_prefix: Option<Whole<1, 32>>,
    /// The leading bits of an IPv6 address that are one client in keys (64: a host's usual
    /// allocation; 128: each address).
    ipv6_prefix: Option<Whole<1, 128>>,
}

impl ClientIpSpec {
    fn into_source(self, path: &Path) -> Result<ClientIpSource, ConfigError> {
        match (self.source.as_deref(), self.header) {
            (Some(_), Some(_)) => Err(path
                .field("header")
                .error("give either `source` or `header`, not both")),
            (None | Some("remote"), None) => match self.trusted_hops {
                Some(_) => Err(path.field("trusted_hops").error("only goes with `header`")),
                None => Ok(ClientIpSource::Remote),
            },
            (Some(other), None) => Err(path.field("source").error(format!(
                "\"{other}\" is not \"remote\"; to read a header use {{\"header\": \"x-forwarded-for\", \"trusted_hops\": 1}}"
            ))),
            (None, Some(name)) => Ok(ClientIpSource::Header {
                name: name.0,
                trusted_hops: self.trusted_hops.map_or(1, |h| h.0 as usize),
            }),
        }
    }
}

#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

    use super::*;

    impl JsonSchema for CountSpec {
        fn schema_name() -> Cow<'static, str> {
            "count".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let weights = generator.subschema_for::<Weights>();
            json_schema!({
                "description": "\"total\" (default), \"prompt\", \"completion\", or a weight per kind of token",
                "oneOf": [{"enum": ["total", "prompt", "completion"]}, weights]
            })
        }
    }

    impl JsonSchema for Weight {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "weight".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "number", "minimum": 0, "maximum": 1_000_000})
        }
    }

    impl JsonSchema for UnknownModelSpec {
        fn schema_name() -> Cow<'static, str> {
            "unknown_model".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let price = generator.subschema_for::<UnknownPrice>();
            json_schema!({"oneOf": [{"enum": ["deny", "free"]}, price]})
        }
    }

    impl JsonSchema for ReserveTokens {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "reserve_tokens".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"oneOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
                {"const": "max_tokens"}
            ]})
        }
    }
}
