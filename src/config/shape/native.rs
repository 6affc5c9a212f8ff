//! The native configuration shape: `service`, `matches`, `limits`, plus the shared options of
//! [`super::options`]. Reading is two steps: serde checks the shape (types, unknown fields,
//! each leaf value), then `into_*` checks what spans fields and builds the model, naming paths.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::config::builder::Builder;
use crate::config::de::{each, Path};
use crate::config::values::{
    Amount, ApiKey, HeaderName, Name, Pattern, Status, Whole, Window, Zone,
};
use crate::config::*;
use crate::limits::Limit;
use crate::limits::{LimitRates, Rate, ValueMatch, ValueRule};
use crate::matcher::RequestMatch;
use crate::matcher::{Condition, StringMatch};
use crate::template::Template;

pub(super) use wire::MAX_AMOUNT;
/// A count of tokens: at least one, at most what the service stores.
pub type Tokens = Whole<1, MAX_AMOUNT>;
pub type Port = Whole<1, 65_535>;
/// `timeout_ms` of a service: 1 ms to 60 s.
pub type TimeoutMs = Whole<1, 60_000>;

/// The native shape's own fields.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Native {
    /// The rate-limit service: `{"cluster": "<Envoy cluster>"}` or `{"host": ..., "port": ...}`.
    service: Option<ServiceSpec>,
    /// Which requests are limited; absent or empty: every request.
    #[serde(default)]
    matches: Vec<MatchSpec>,
    /// The budgets every admitted request is checked against.
    limits: Option<Vec<LimitSpec>>,
}

impl Native {
    pub fn into_builder(self, path: &Path) -> Result<Builder, ConfigError> {
        let service = self.service.ok_or_else(|| path.field("service").error(
            "is required: name the rate-limit service as {\"cluster\": \"<envoy cluster>\"} or {\"host\": \"<service host>\", \"port\": 80}",
        ))?.into_service(&path.field("service"))?;
        let matches = request_matches(&path.field("matches"), self.matches)?;
        let limits_path = path.field("limits");
        let limits = each(
            &limits_path,
            self.limits,
            "is required: list at least one limit",
            "is empty: list at least one limit",
            LimitSpec::into_limit,
        )?;
        within_contract(&limits_path, &limits)?;
        for (i, l) in limits.iter().enumerate() {
            if limits[..i].iter().any(|o| o.name == l.name) {
                return Err(limits_path.index(i).field("name").error(format!(
                    "`{}` is used by another limit; names must be unique",
                    l.name
                )));
            }
        }
        if service.protocol != Protocol::EnvoyRls {
            if let Some(i) = limits.iter().position(|l| l.engine_window_s.is_some()) {
                let at = limits_path.index(i);
                return Err(at.field("tokens").error(
                    "is required with `window` (a `window` alone declares the engine's window, under protocol \"envoy-rls\" only)",
                ));
            }
        }
        if service.protocol == Protocol::EnvoyRls {
            if let Some(i) = limits
                .iter()
                .position(|l| !matches!(l.rates, LimitRates::ServiceOwned))
            {
                return Err(limits_path.index(i).error(
                    "has rates or values, but with protocol \"envoy-rls\" the rate-limit service's own configuration defines the budgets; remove `tokens`/`window`/`rates`/`values`",
                ));
            }
        }
        Ok(Builder::new(service, matches, limits))
    }
}

/// Refuses limits the rate-limit service would refuse in every check (which `failure_mode:
/// allow` would then let through): too many for one request, names too long, too many rates.
pub(super) fn within_contract(path: &Path, limits: &[Limit]) -> Result<(), ConfigError> {
    if limits.len() > wire::MAX_DESCRIPTORS {
        return Err(path.error(format!(
            "has {} limits; the rate-limit service takes at most {} per request",
            limits.len(),
            wire::MAX_DESCRIPTORS
        )));
    }
    for (i, l) in limits.iter().enumerate() {
        if l.name.len() > wire::MAX_TEXT {
            return Err(path.index(i).error(format!(
                "has a name of {} bytes; at most {} are allowed",
                l.name.len(),
                wire::MAX_TEXT
            )));
        }
        let rate_lists: Vec<&[Rate]> = match &l.rates {
            LimitRates::Fixed(r) => vec![r],
            LimitRates::PerValue(rules) => rules.iter().map(|r| r.rates.as_slice()).collect(),
            LimitRates::ServiceOwned => Vec::new(),
        };
        if rate_lists.iter().any(|r| r.len() > wire::MAX_RATES) {
            return Err(path.index(i).error(format!(
                "has more than {} rates for one value; the rate-limit service takes at most that",
                wire::MAX_RATES
            )));
        }
    }
    Ok(())
}

/// Which wire protocol the rate-limit service speaks.
#[derive(Deserialize, Clone, Copy, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolSpec {
    #[default]
    V1,
    Asm,
    EnvoyRls,
}

impl From<ProtocolSpec> for Protocol {
    fn from(p: ProtocolSpec) -> Protocol {
        match p {
            ProtocolSpec::V1 => Protocol::V1,
            ProtocolSpec::Asm => Protocol::Asm,
            ProtocolSpec::EnvoyRls => Protocol::EnvoyRls,
        }
    }
}

#[derive(Deserialize, Clone, Copy, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum FailureModeSpec {
    /// Admit the request when the service cannot answer.
    #[default]
    Allow,
    /// Refuse it with `failure_status`.
    Deny,
}

/// The rate-limit service.
#[derive(Deserialize, Clone)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The Envoy cluster of the service (give this or `host`).
    cluster: Option<Name>,
    /// The service's host; the cluster is Istio's `outbound|<port>||<host>`.
    host: Option<Name>,
    /// With `host`: its port (80).
    port: Option<Port>,
    #[serde(default)]
    protocol: ProtocolSpec,
    /// `envoy-rls`: the rate-limit domain (required there, refused otherwise).
    domain: Option<String>,
    /// `envoy-rls`: entries put before `(limit, value)` in every descriptor.
    descriptor_entries: Option<BTreeMap<String, String>>,
    /// How long a check may take, in milliseconds (500).
    timeout_ms: Option<TimeoutMs>,
    #[serde(default)]
    failure_mode: FailureModeSpec,
    /// The status of a request refused by `failure_mode: deny` (503).
    failure_status: Option<Status>,
    /// The service's API key (`--api-key`), sent on every call as
    /// `authorization: Bearer <key>`.
    api_key: Option<ApiKey>,
    #[serde(default)]
    admission: AdmissionSpec,
}

#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum AdmissionSpec {
    /// Every limited request waits for a check.
    #[default]
    Check,
    /// Requests for keys far from their limits are admitted under quota leases the plugin
    /// holds, with no check each (protocol v1 only).
    Lease,
}

impl ServiceSpec {
    pub fn into_service(self, path: &Path) -> Result<ServiceConfig, ConfigError> {
        let (cluster, authority) = match (self.cluster, self.host) {
            (Some(_), Some(_)) => {
                return Err(path
                    .field("host")
                    .error("give either `cluster` or `host`, not both"))
            }
            (None, None) => {
                return Err(
                    path.error("needs `cluster` (an Envoy cluster name) or `host` (+ `port`)")
                )
            }
            (Some(c), None) => {
                if self.port.is_some() {
                    return Err(path.field("port").error("only goes with `host`"));
                }
                (c.0.clone(), c.0)
            }
            (None, Some(h)) => {
                let port = self.port.map_or(80, |p| p.0);
                (format!("outbound|{port}||{}", h.0), h.0)
            }
        };
        let protocol = Protocol::from(self.protocol);
        let domain = match (protocol, self.domain) {
            (Protocol::EnvoyRls, Some(d)) if !d.is_empty() => d,
            (Protocol::EnvoyRls, _) => {
                return Err(path.field("domain").error(
                    "is required with protocol \"envoy-rls\": the domain of the rate-limit service's configuration",
                ))
            }
            (_, Some(_)) => {
                return Err(path
                    .field("domain")
                    .error("only goes with protocol \"envoy-rls\""))
            }
            (_, None) => String::new(),
        };
        let descriptor_entries = match self.descriptor_entries {
            None => Vec::new(),
            Some(_) if protocol != Protocol::EnvoyRls => {
                return Err(path
                    .field("descriptor_entries")
                    .error("only goes with protocol \"envoy-rls\""))
            }
            Some(entries) => {
                if entries.contains_key("") {
                    return Err(path.field("descriptor_entries").error("has an empty key"));
                }
                entries.into_iter().collect()
            }
        };
        if self.admission == AdmissionSpec::Lease && protocol != Protocol::V1 {
            return Err(path.field("admission").error(
                "\"lease\" needs protocol \"v1\": only this project's service grants leases",
            ));
        }
        Ok(ServiceConfig {
            leases: self.admission == AdmissionSpec::Lease,
            cluster,
            authority,
            protocol,
            timeout_ms: self.timeout_ms.map_or(500, |t| t.0),
            failure_mode: match self.failure_mode {
                FailureModeSpec::Allow => FailureMode::Allow,
                FailureModeSpec::Deny => FailureMode::Deny,
            },
            failure_status: self.failure_status.map_or(503, |s| s.0),
            domain,
            descriptor_entries,
            api_key: self.api_key.map(|k| k.0),
        })
    }
}

/// How a string (host, path, header, model) is compared: exactly one of these.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("minProperties" = 1, "maxProperties" = 1))
)]
#[serde(deny_unknown_fields)]
pub struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    suffix: Option<String>,
    contains: Option<String>,
    regex: Option<Pattern>,
    /// Only `true`: the thing (a header) has to be there, with any value.
    present: Option<bool>,
}

impl StringMatchSpec {
    fn into_match(self, path: &Path) -> Result<StringMatch, ConfigError> {
        let mut found = Vec::new();
        let mut set = |name: &'static str, m: Option<StringMatch>| {
            if let Some(m) = m {
                found.push((name, m));
            }
        };
        set("exact", self.exact.map(StringMatch::Exact));
        set("prefix", self.prefix.map(StringMatch::Prefix));
        set("suffix", self.suffix.map(StringMatch::Suffix));
        set("contains", self.contains.map(StringMatch::Contains));
        set("regex", self.regex.map(|r| StringMatch::Regex(r.0)));
        match self.present {
            Some(true) => set("present", Some(StringMatch::Present)),
            Some(false) => {
                return Err(path
                    .field("present")
                    .error("can only be true (a condition on something absent never holds)"))
            }
            None => {}
        }
        match found.len() {
            0 => Err(path
                .error("needs one of `exact`, `prefix`, `suffix`, `contains`, `regex`, `present`")),
            1 => Ok(found.swap_remove(0).1),
            _ => {
                let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
                Err(path.error(format!(
                    "names {} at once; give exactly one",
                    names.join(" and ")
                )))
            }
        }
    }
}

/// One method or a list of them.
#[derive(Default)]
pub struct Methods(Vec<String>);

impl<'de> Deserialize<'de> for Methods {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Methods;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a method name or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Methods, E> {
                Ok(Methods(vec![s.to_ascii_uppercase()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Methods, A::Error> {
                let mut methods = Vec::new();
                while let Some(m) = seq.next_element::<String>()? {
                    methods.push(m.to_ascii_uppercase());
                }
                Ok(Methods(methods))
            }
        }
        d.deserialize_any(V)
    }
}

/// A request matcher (`matches` entries), or with `model` a limit's `when` condition.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// The request's host (`:authority` without the port), compared in lower case.
    host: Option<StringMatchSpec>,
    /// The request's path without the query string.
    path: Option<StringMatchSpec>,
    /// A method or a list of methods.
    #[cfg_attr(feature = "schema", schemars(with = "Option<MethodsSchema>"))]
    method: Option<Methods>,
    /// Headers by name; an absent header never matches.
    headers: Option<BTreeMap<String, StringMatchSpec>>,
    /// Only in a limit's `when`: the model the request body names.
    model: Option<StringMatchSpec>,
}

#[cfg(feature = "schema")]
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum MethodsSchema {
    One(String),
    Several(Vec<String>),
}

impl MatchSpec {
    fn into_parts(self, path: &Path) -> Result<(RequestMatch, Option<StringMatch>), ConfigError> {
        let lower = |m: StringMatch| match m {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
            StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
            StringMatch::Contains(s) => StringMatch::Contains(s.to_ascii_lowercase()),
            re => re,
        };
        let host = self
            .host
            .map(|h| h.into_match(&path.field("host")).map(lower))
            .transpose()?;
        let request_path = self
            .path
            .map(|p| p.into_match(&path.field("path")))
            .transpose()?;
        let headers = self
            .headers
            .unwrap_or_default()
            .into_iter()
            .map(|(name, m)| {
                let at = path.field("headers").field(&name);
                if !HeaderName::valid(&name) {
                    return Err(at.error("is not a valid header name"));
                }
                Ok((name.to_ascii_lowercase(), m.into_match(&at)?))
            })
            .collect::<Result<_, _>>()?;
        let model = self
            .model
            .map(|m| m.into_match(&path.field("model")))
            .transpose()?;
        let request = RequestMatch {
            host,
            path: request_path,
            methods: self.method.unwrap_or_default().0,
            headers,
        };
        Ok((request, model))
    }

    /// A `when` condition.
    fn into_condition(self, path: &Path) -> Result<Condition, ConfigError> {
        let (request, model) = self.into_parts(path)?;
        Ok(Condition::new(request, model))
    }
}

/// `matches` entries: decided on the headers alone, so they cannot name the model.
pub(super) fn request_matches(
    path: &Path,
    items: Vec<MatchSpec>,
) -> Result<Vec<RequestMatch>, ConfigError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.into_parts(&path.index(i))? {
            (request, None) => Ok(request),
            (_, Some(_)) => Err(path.index(i).field("model").error(
                "only a limit's `when` may name the model: `matches` are decided before the body is read",
            )),
        })
        .collect()
}

/// One budget of a limit: `tokens` (or, for a limit in money, `budget`) per `window`.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    tokens: Option<Tokens>,
    /// With `"unit": "cost"`: the amount of money, e.g. `"20.00"`.
    budget: Option<Amount>,
    window: Window,
}

/// What a limit counts.
#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum UnitSpec {
    /// Tokens, as `usage.count` says (the default).
    #[default]
    Tokens,
    /// Money: what the request cost by the `prices` table, in its currency.
    Cost,
}

/// How a limit's rates are written: in tokens or in money, calendar periods in which zone.
#[derive(Clone, Copy)]
struct Counting<'a> {
    cost: bool,
    timezone: &'a str,
}

impl Counting<'_> {
    /// The budget of one rate: `tokens`, or for a limit in money `budget`, in micro units.
    fn amount(
        &self,
        path: &Path,
        tokens: Option<Tokens>,
        budget: Option<Amount>,
    ) -> Result<u64, ConfigError> {
        match (self.cost, tokens, budget) {
            (false, Some(t), None) => Ok(t.0),
            (true, None, Some(Amount(0))) => Err(path.field("budget").error("must be more than 0")),
            (true, None, Some(b)) => Ok(b.0),
            (false, _, Some(_)) => Err(path
                .field("budget")
                .error("only goes with \"unit\": \"cost\"; a limit in tokens has `tokens`")),
            (true, Some(_), _) => Err(path.field("tokens").error(
                "a limit with \"unit\": \"cost\" counts money: give `budget` (e.g. \"20.00\")",
            )),
            (false, None, None) => Err(path.field("tokens").error("is required with `window`")),
            (true, None, None) => Err(path.field("budget").error("is required with `window`")),
        }
    }

    fn rate(&self, amount: u64, window: Window) -> Rate {
        match window {
            Window::Rolling(window_s) => Rate {
                budget: amount,
                window_s,
                calendar: None,
            },
            Window::Calendar(period) => Rate {
                budget: amount,
                window_s: period.longest_s(),
                calendar: Some(wire::Calendar {
                    period,
                    timezone: self.timezone.to_string(),
                }),
            },
        }
    }

    /// `tokens`/`budget` + `window`, or `rates`; `Ok(None)` when neither is given.
    fn rates(
        &self,
        path: &Path,
        tokens: Option<Tokens>,
        budget: Option<Amount>,
        window: Option<Window>,
        list: Option<Vec<RateSpec>>,
    ) -> Result<Option<Vec<Rate>>, ConfigError> {
        let short = tokens.is_some() || budget.is_some() || window.is_some();
        match (short, window, list) {
            (true, _, Some(_)) => Err(path
                .field("rates")
                .error("give either `tokens` + `window` or `rates`, not both")),
            (true, None, None) => Err(path.field("window").error(if self.cost {
                "is required with `budget`"
            } else {
                "is required with `tokens`"
            })),
            (true, Some(w), None) => {
                Ok(Some(vec![self.rate(self.amount(path, tokens, budget)?, w)]))
            }
            (false, _, None) => Ok(None),
            (false, _, Some(list)) if list.is_empty() => Err(path
                .field("rates")
                .error("is empty: list at least one rate")),
            (false, _, Some(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let at = path.field("rates").index(i);
                    Ok(self.rate(self.amount(&at, r.tokens, r.budget)?, r.window))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    }
}

/// One limit: a key, and its budgets (or none: the service's own configuration decides).
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Unique among the limits; the service's name for the budget.
    name: Name,
    /// A key template, e.g. `{{request.headers.x-user}}`; `""` is one global counter.
    key: Option<String>,
    /// Applies only to requests that match this (it may name the `model`).
    when: Option<MatchSpec>,
    /// `"tokens"` (default) or `"cost"`: money, priced by the `prices` table.
    #[serde(default)]
    unit: UnitSpec,
    tokens: Option<Tokens>,
    /// With `"unit": "cost"`: the amount of money per window, e.g. `"20.00"`.
    budget: Option<Amount>,
    /// The window of `tokens` or `budget`; alone, under envoy-rls, the engine's window for
    /// this limit (the retry a denial states when the engine names none).
    window: Option<Window>,
    /// The IANA time zone of calendar windows (`"month"`, …): `UTC` unless given.
    timezone: Option<Zone>,
    /// Several budgets at once (give this or `tokens` + `window`).
    rates: Option<Vec<RateSpec>>,
    /// Budgets by key value (give this or rates on the limit).
    values: Option<Vec<ValueRuleSpec>>,
    /// The status of a request this limit denies (default: `deny.status`, 429), e.g. 403 as
    /// Azure API Management answers a spent quota.
    deny_status: Option<Status>,
    /// `"enforce"` (default) or `"shadow"`: checked and counted exactly, but never denies; a
    /// request it would have denied is counted, logged and marked
    /// `x-ratelimit-shadow-denied`. For rolling out a new budget safely.
    #[serde(default)]
    mode: ModeSpec,
    /// Fractions of the budget (e.g. `[0.5, 0.8, 1.0]`, each above 0 and at most 10) at which
    /// the service raises an alert (a webhook, a metric, the console), once per threshold, key
    /// and window. With `"mode": "shadow"`: a soft budget that only alerts.
    alerts: Option<Vec<f64>>,
}

/// Whether a limit denies.
#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ModeSpec {
    #[default]
    Enforce,
    /// Checked and counted, never denies.
    Shadow,
}

impl LimitSpec {
    fn into_limit(self, path: &Path) -> Result<Limit, ConfigError> {
        let key_text = self.key.ok_or_else(|| {
            path.field("key")
                .error("is required (use \"\" for one global counter)")
        })?;
        let key = Template::parse(&key_text).map_err(|e| path.field("key").error(e))?;
        let when = self
            .when
            .map(|w| w.into_condition(&path.field("when")))
            .transpose()?;
        let counting = Counting {
            cost: self.unit == UnitSpec::Cost,
            timezone: self.timezone.as_ref().map_or("UTC", |z| z.0.as_str()),
        };
        // A `window` alone declares the envoy-rls engine's window (checked once the protocol
        // is known); with anything else it is a rate's.
        let declares = self.tokens.is_none()
            && self.budget.is_none()
            && self.rates.is_none()
            && self.values.is_none();
        let (window, engine_window_s) = match self.window {
            Some(Window::Rolling(s)) if declares => (None, Some(s)),
            Some(Window::Calendar(_)) if declares => {
                return Err(path.field("window").error(
                    "alone declares the envoy-rls engine's window, which is a number of seconds (Limitador has no calendar windows); give `tokens` with a calendar window",
                ))
            }
            w => (w, None),
        };
        let own_rates = counting.rates(path, self.tokens, self.budget, window, self.rates)?;
        let values_path = path.field("values");
        let rates = match (own_rates, self.values) {
            (Some(_), Some(_)) => {
                return Err(
                    values_path.error("give either rates on the limit or `values`, not both")
                )
            }
            (Some(r), None) => LimitRates::Fixed(r),
            (None, None) => LimitRates::ServiceOwned,
            (None, Some(items)) if items.is_empty() => {
                return Err(values_path.error("is empty: list at least one value rule"))
            }
            (None, Some(items)) => LimitRates::PerValue(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| v.into_rule(&values_path.index(i), counting))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Limit {
            name: self.name.0,
            key,
            rates,
            exclusive: false,
            when,
            // Set from the price table once the options are read.
            currency: counting.cost.then(String::new),
            deny_status: self.deny_status.map(|s| s.0),
            engine_window_s,
            shadow: self.mode == ModeSpec::Shadow,
            alerts: match self.alerts {
                Some(fractions) => thresholds(&fractions, &path.field("alerts"))?,
                None => Vec::new(),
            },
        })
    }
}

/// A limit's alert thresholds, checked: each above 0 and at most [`wire::MAX_THRESHOLD`], no
/// two alike, at most [`wire::MAX_ALERTS`]; kept in ascending order.
fn thresholds(fractions: &[f64], path: &Path) -> Result<Vec<wire::Threshold>, ConfigError> {
    if fractions.is_empty() || fractions.len() > wire::MAX_ALERTS {
        return Err(path.error(format!(
            "lists 1 to {} thresholds (fractions of the budget, e.g. [0.5, 0.8, 1.0])",
            wire::MAX_ALERTS
        )));
    }
    let mut out: Vec<wire::Threshold> = Vec::with_capacity(fractions.len());
    for (i, f) in fractions.iter().enumerate() {
        let t = wire::Threshold::of(*f).ok_or_else(|| {
            path.index(i).error(format!(
                "is a fraction of the budget from 0.001 to {}",
                wire::MAX_THRESHOLD
            ))
        })?;
        if out.contains(&t) {
            return Err(path.index(i).error("repeats a threshold"));
        }
        out.push(t);
    }
    out.sort();
    Ok(out)
}

/// Budgets for the key values that match `match`.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ValueRuleSpec {
    /// An exact value, `regexp:<re>`, an address or CIDR, or `*` (any value).
    #[serde(rename = "match")]
    pattern: String,
    tokens: Option<Tokens>,
    /// With `"unit": "cost"` on the limit: the amount of money per window.
    budget: Option<Amount>,
    window: Option<Window>,
    rates: Option<Vec<RateSpec>>,
    /// Every value this rule matches draws on one pool, instead of each on its own.
    shared: Option<bool>,
}

impl ValueRuleSpec {
    fn into_rule(self, path: &Path, counting: Counting<'_>) -> Result<ValueRule, ConfigError> {
        let matcher = value_match(&path.field("match"), &self.pattern)?;
        let rates = counting
            .rates(path, self.tokens, self.budget, self.window, self.rates)?
            .ok_or_else(|| {
                path.error("needs `tokens` + `window` or `rates` for the values it matches")
            })?;
        Ok(ValueRule {
            matcher,
            pattern: self.pattern,
            rates,
            shared: self.shared.unwrap_or(false),
        })
    }
}

fn value_match(path: &Path, pattern: &str) -> Result<ValueMatch, ConfigError> {
    Ok(if pattern == "*" {
        ValueMatch::Any
    } else if let Some(re) = pattern.strip_prefix("regexp:") {
        ValueMatch::Regex(Pattern::compile(re).map_err(|e| path.error(e))?)
    } else if let Ok(net) = pattern.parse::<IpNet>() {
        ValueMatch::Ip(net)
    } else if let Ok(ip) = pattern.parse::<std::net::IpAddr>() {
        ValueMatch::Ip(IpNet::from(ip))
    } else {
        ValueMatch::Exact(pattern.to_string())
    })
}
