//! The native configuration shape (DESIGN section 2.1).

use ipnet::IpNet;
use regex::Regex;
use serde_json::Value;

use super::fields::{kind, whole_number, Object, Path};
use super::*;
use crate::limits::{LimitRates, Rate, ValueMatch, ValueRule};
use crate::matcher::{Condition, StringMatch};
use crate::template::Template;

pub(super) use wire::{MAX_TOKENS, MAX_WINDOW_S};
const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

pub fn parse(value: &Value) -> Result<Config, ConfigError> {
    let mut root = Object::new(Path::root(), value)?;

    let service = match root.object("service")? {
        Some(s) => service(s)?,
        None => return Err(root.path.field("service").error(
            "is required: name the rate-limit service as {\"cluster\": \"<envoy cluster>\"} or {\"host\": \"<service host>\", \"port\": 80}",
        )),
    };
    let matches = matches(&mut root, "matches")?;

    let limits_path = root.path.field("limits");
    let limits: Vec<Limit> = match root.array("limits")? {
        None => return Err(limits_path.error("is required: list at least one limit")),
        Some(items) if items.is_empty() => {
            return Err(limits_path.error("is empty: list at least one limit"))
        }
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, l)| limit(Object::new(limits_path.index(i), l)?))
            .collect::<Result<_, _>>()?,
    };
    within_contract(&limits_path, &limits)?;
    for (i, l) in limits.iter().enumerate() {
        if limits[..i].iter().any(|o| o.name == l.name) {
            return Err(limits_path.index(i).field("name").error(format!(
                "`{}` is used by another limit; names must be unique",
                l.name
            )));
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
    let options = options(&mut root)?;
    root.finish()?;
    Ok(options.into_config(service, matches, limits))
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

/// The fields every shape shares (usage, reserve, deny, client IP, …), with their defaults.
pub(super) struct Options {
    pub count: Count,
    pub on_missing: OnMissing,
    pub reserve: Reserve,
    pub reserve_max: u64,
    pub inject_stream_usage: bool,
    pub deny: DenyConfig,
    pub quota_headers: bool,
    pub higress_headers: bool,
    pub client_ip: ClientIpSource,
    pub consumer_header: String,
    pub max_request_body_bytes: usize,
    pub max_pending_reports: usize,
}

impl Options {
    pub fn into_config(
        self,
        service: ServiceConfig,
        matches: Vec<RequestMatch>,
        limits: Vec<Limit>,
    ) -> Config {
        Config {
            service,
            matches,
            limits,
            count: self.count,
            on_missing: self.on_missing,
            reserve: self.reserve,
            reserve_max: self.reserve_max,
            inject_stream_usage: self.inject_stream_usage,
            deny: self.deny,
            quota_headers: self.quota_headers,
            higress_headers: self.higress_headers,
            client_ip: self.client_ip,
            consumer_header: self.consumer_header,
            max_request_body_bytes: self.max_request_body_bytes,
            max_pending_reports: self.max_pending_reports,
            needs_request_body: false,
            match_headers: Vec::new(),
        }
    }
}

/// Reads the shared fields of `root`.
pub(super) fn options(root: &mut Object<'_>) -> Result<Options, ConfigError> {
    let (count, on_missing) = match root.object("usage")? {
        None => (Count::Total, OnMissing::Estimate),
        Some(u) => usage(u)?,
    };

    let (reserve, reserve_max) = match root.object("reserve")? {
        None => (Reserve::Tokens(0), MAX_TOKENS),
        Some(mut r) => {
            let path = r.path.field("tokens");
            let reserve = match r.value("tokens") {
                None => Reserve::Tokens(0),
                Some(Value::String(s)) if s == "max_tokens" => Reserve::MaxTokens,
                Some(v @ Value::Number(_)) => Reserve::Tokens(whole_number(&path, v, MAX_TOKENS)?),
                Some(other) => {
                    return Err(path.error(format!(
                        "expected a number of tokens or \"max_tokens\", found {}",
                        describe(other)
                    )))
                }
            };
            let max = match r.u64_max("max", MAX_TOKENS)? {
                Some(0) => return Err(r.path.field("max").error("must be at least 1")),
                Some(max) => max,
                None => MAX_TOKENS,
            };
            r.finish()?;
            (reserve, max)
        }
    };

    let inject_stream_usage = root.bool("inject_stream_usage")?.unwrap_or(true);

    let deny = match root.object("deny")? {
        None => DenyConfig {
            status: 429,
            body: None,
            headers: Vec::new(),
        },
        Some(d) => deny(d)?,
    };

    let quota_headers = root.bool("quota_headers")?.unwrap_or(true);

    let client_ip = match root.object("client_ip")? {
        None => ClientIpSource::Remote,
        Some(c) => client_ip(c)?,
    };

    let consumer_header = header_name(root, "consumer_header")?.unwrap_or("x-mse-consumer".into());

    let max_pending_reports = match root.u64_max("max_pending_reports", 1_000_000)? {
        Some(0) => {
            return Err(root
                .path
                .field("max_pending_reports")
                .error("must be at least 1"))
        }
        Some(n) => n as usize,
        None => crate::report::DEFAULT_CAPACITY,
    };
    let max_request_body_bytes = match root.u64_max("max_request_body_bytes", MAX_BODY_BYTES)? {
        Some(0) => {
            return Err(root
                .path
                .field("max_request_body_bytes")
                .error("must be at least 1"))
        }
        Some(n) => n as usize,
        None => 1024 * 1024,
    };
    Ok(Options {
        count,
        on_missing,
        reserve,
        reserve_max,
        inject_stream_usage,
        deny,
        quota_headers,
        higress_headers: false,
        client_ip,
        consumer_header,
        max_request_body_bytes,
        max_pending_reports,
    })
}

/// A list of request matchers under `name` (absent: every request).
pub(super) fn matches(
    root: &mut Object<'_>,
    name: &'static str,
) -> Result<Vec<RequestMatch>, ConfigError> {
    match root.array(name)? {
        None => Ok(Vec::new()),
        Some(items) => {
            let path = root.path.field(name);
            items
                .iter()
                .enumerate()
                .map(|(i, m)| request_match(Object::new(path.index(i), m)?))
                .collect()
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => kind(other).to_string(),
    }
}

pub(super) fn service(mut s: Object<'_>) -> Result<ServiceConfig, ConfigError> {
    let cluster = s.string("cluster")?;
    let host = s.string("host")?;
    let port = s.u64_max("port", 65_535)?;
    let (cluster, authority) = match (cluster, host) {
        (Some(_), Some(_)) => {
            return Err(s
                .path
                .field("host")
                .error("give either `cluster` or `host`, not both"))
        }
        (None, None) => {
            return Err(s
                .path
                .error("needs `cluster` (an Envoy cluster name) or `host` (+ `port`)"))
        }
        (Some(""), _) => return Err(s.path.field("cluster").error("must not be empty")),
        (Some(c), None) => {
            if port.is_some() {
                return Err(s.path.field("port").error("only goes with `host`"));
            }
            (c.to_string(), c.to_string())
        }
        (None, Some(h)) => {
            if h.is_empty() {
                return Err(s.path.field("host").error("must not be empty"));
            }
            let port = port.unwrap_or(80);
            if port == 0 {
                return Err(s.path.field("port").error("must be between 1 and 65535"));
            }
            (format!("outbound|{port}||{h}"), h.to_string())
        }
    };
    let protocol = match s.string("protocol")? {
        None | Some("v1") => Protocol::V1,
        Some("asm") => Protocol::Asm,
        Some("envoy-rls") => Protocol::EnvoyRls,
        Some(other) => {
            return Err(s.path.field("protocol").error(format!(
                "\"{other}\" is not one of \"v1\", \"asm\", \"envoy-rls\""
            )))
        }
    };
    let domain = s.string("domain")?;
    let domain = match (protocol, domain) {
        (Protocol::EnvoyRls, Some(d)) if !d.is_empty() => d.to_string(),
        (Protocol::EnvoyRls, _) => {
            return Err(s.path.field("domain").error(
                "is required with protocol \"envoy-rls\": the domain of the rate-limit service's configuration",
            ))
        }
        (_, Some(_)) => {
            return Err(s
                .path
                .field("domain")
                .error("only goes with protocol \"envoy-rls\""))
        }
        (_, None) => String::new(),
    };
    let descriptor_entries = match s.object("descriptor_entries")? {
        None => Vec::new(),
        Some(_) if protocol != Protocol::EnvoyRls => {
            return Err(s
                .path
                .field("descriptor_entries")
                .error("only goes with protocol \"envoy-rls\""))
        }
        Some(o) => o
            .entries()
            .map(|(k, v)| match v {
                Value::String(v) if !k.is_empty() => Ok((k.clone(), v.clone())),
                other => Err(o
                    .path
                    .field(k)
                    .error(format!("expected a string, found {}", kind(other)))),
            })
            .collect::<Result<_, _>>()?,
    };
    let timeout_ms = timeout_ms(&mut s)?;
    let failure_mode = match s.string("failure_mode")? {
        None | Some("allow") => FailureMode::Allow,
        Some("deny") => FailureMode::Deny,
        Some(other) => {
            return Err(s
                .path
                .field("failure_mode")
                .error(format!("\"{other}\" is not one of \"allow\", \"deny\"")))
        }
    };
    let failure_status = status(&mut s, "failure_status")?.unwrap_or(503);
    s.finish()?;
    Ok(ServiceConfig {
        cluster,
        authority,
        protocol,
        timeout_ms,
        failure_mode,
        failure_status,
        domain,
        descriptor_entries,
    })
}

/// `timeout_ms` of a service block: 1 ms to 60 s, 500 by default.
pub(super) fn timeout_ms(s: &mut Object<'_>) -> Result<u64, ConfigError> {
    match s.u64_max("timeout_ms", MAX_TIMEOUT_MS)? {
        Some(0) => Err(s.path.field("timeout_ms").error("must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(500),
    }
}

pub(super) fn status(o: &mut Object<'_>, name: &'static str) -> Result<Option<u32>, ConfigError> {
    match o.u64_max(name, 599)? {
        Some(n) if n < 200 => Err(o
            .path
            .field(name)
            .error(format!("{n} is not an HTTP status between 200 and 599"))),
        other => Ok(other.map(|n| n as u32)),
    }
}

fn header_name(o: &mut Object<'_>, name: &'static str) -> Result<Option<String>, ConfigError> {
    match o.string(name)? {
        None => Ok(None),
        Some(h) if valid_header_name(h) => Ok(Some(h.to_ascii_lowercase())),
        Some(h) => Err(o
            .path
            .field(name)
            .error(format!("\"{h}\" is not a valid header name"))),
    }
}

pub(super) fn valid_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b) || (i == 0 && b == b':')
        })
}

fn string_match(path: Path, v: &Value) -> Result<StringMatch, ConfigError> {
    let mut o = Object::new(path, v)?;
    let mut found = Vec::new();
    for kind in ["exact", "prefix", "suffix", "contains", "regex", "present"] {
        if o.has(kind) {
            found.push(kind);
        }
    }
    let m = match found.as_slice() {
        ["present"] => match o.bool("present")? {
            Some(true) => StringMatch::Present,
            _ => {
                return Err(o
                    .path
                    .field("present")
                    .error("can only be true (a condition on something absent never holds)"))
            }
        },
        [kind] => {
            let text = match *kind {
                "exact" => o.required_string("exact")?,
                "prefix" => o.required_string("prefix")?,
                "suffix" => o.required_string("suffix")?,
                "contains" => o.required_string("contains")?,
                _ => o.required_string("regex")?,
            };
            match *kind {
                "exact" => StringMatch::Exact(text.into()),
                "prefix" => StringMatch::Prefix(text.into()),
                "suffix" => StringMatch::Suffix(text.into()),
                "contains" => StringMatch::Contains(text.into()),
                _ => StringMatch::Regex(regex(&o.path.field("regex"), text)?),
            }
        }
        [] => {
            return Err(o
                .path
                .error("needs one of `exact`, `prefix`, `suffix`, `contains`, `regex`, `present`"))
        }
        several => {
            return Err(o.path.error(format!(
                "names {} at once; give exactly one",
                several.join(" and ")
            )))
        }
    };
    o.finish()?;
    Ok(m)
}

pub(super) fn regex(path: &Path, text: &str) -> Result<Regex, ConfigError> {
    Regex::new(text).map_err(|e| path.error(format!("invalid regular expression: {e}")))
}

/// A limit's `when`: a `matches` entry that may also name the `model`.
fn condition(mut o: Object<'_>) -> Result<Condition, ConfigError> {
    let model = o
        .value("model")
        .map(|v| string_match(o.path.field("model"), v))
        .transpose()?;
    Ok(Condition::new(request_match(o)?, model))
}

fn request_match(mut m: Object<'_>) -> Result<RequestMatch, ConfigError> {
    let host = m
        .value("host")
        .map(|v| string_match(m.path.field("host"), v))
        .transpose()?;
    let host = host.map(|h| match h {
        StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
        StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
        StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
        StringMatch::Contains(s) => StringMatch::Contains(s.to_ascii_lowercase()),
        re => re,
    });
    let path = m
        .value("path")
        .map(|v| string_match(m.path.field("path"), v))
        .transpose()?;
    let method_path = m.path.field("method");
    let methods = match m.value("method") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.to_ascii_uppercase()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.to_ascii_uppercase()),
                other => Err(method_path
                    .index(i)
                    .error(format!("expected a string, found {}", kind(other)))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(method_path.error(format!(
                "expected a method name or a list of them, found {}",
                kind(other)
            )))
        }
    };
    let headers = match m.object("headers")? {
        None => Vec::new(),
        Some(h) => h
            .entries()
            .map(|(name, v)| {
                let path = h.path.field(name);
                if !valid_header_name(name) {
                    return Err(path.error("is not a valid header name"));
                }
                Ok((name.to_ascii_lowercase(), string_match(path, v)?))
            })
            .collect::<Result<_, _>>()?,
    };
    m.finish()?;
    Ok(RequestMatch {
        host,
        path,
        methods,
        headers,
    })
}

fn window(path: &Path, v: &Value) -> Result<u64, ConfigError> {
    let seconds = match v {
        Value::Number(_) => whole_number(path, v, MAX_WINDOW_S)?,
        Value::String(s) => {
            let (digits, unit) =
                s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let scale = match unit {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3_600,
                "d" => 86_400,
                _ => 0,
            };
            match digits.parse::<u64>() {
                Ok(n) if scale > 0 => n.saturating_mul(scale),
                _ => {
                    return Err(path.error(format!(
                        "\"{s}\" is not a window; use \"1s\", \"1m\", \"1h\", \"1d\" (any count) or a number of seconds"
                    )))
                }
            }
        }
        other => {
            return Err(path.error(format!(
                "expected a window such as \"1m\", found {}",
                kind(other)
            )))
        }
    };
    match seconds {
        0 => Err(path.error("must be at least one second")),
        s if s > MAX_WINDOW_S => Err(path.error(format!(
            "is longer than the maximum of {MAX_WINDOW_S} seconds"
        ))),
        s => Ok(s),
    }
}

fn rate(o: &mut Object<'_>) -> Result<Rate, ConfigError> {
    let tokens = match o.u64_max("tokens", MAX_TOKENS)? {
        None => return Err(o.path.field("tokens").error("is required")),
        Some(0) => return Err(o.path.field("tokens").error("must be at least 1")),
        Some(n) => n,
    };
    let window_s = match o.value("window") {
        None => return Err(o.path.field("window").error("is required with `tokens`")),
        Some(v) => window(&o.path.field("window"), v)?,
    };
    Ok(Rate { tokens, window_s })
}

/// `tokens` + `window` or `rates: [...]`; `Ok(None)` when neither is given.
fn rates(o: &mut Object<'_>) -> Result<Option<Vec<Rate>>, ConfigError> {
    let short = o.has("tokens") || o.has("window");
    let list = o.array("rates")?;
    match (short, list) {
        (true, Some(_)) => Err(o
            .path
            .field("rates")
            .error("give either `tokens` + `window` or `rates`, not both")),
        (true, None) => Ok(Some(vec![rate(o)?])),
        (false, None) => {
            o.allow("tokens");
            o.allow("window");
            Ok(None)
        }
        (false, Some(items)) => {
            o.allow("tokens");
            o.allow("window");
            if items.is_empty() {
                return Err(o
                    .path
                    .field("rates")
                    .error("is empty: list at least one rate"));
            }
            let path = o.path.field("rates");
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let mut r = Object::new(path.index(i), v)?;
                    let rate = rate(&mut r)?;
                    r.finish()?;
                    Ok(rate)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
    }
}

fn limit(mut l: Object<'_>) -> Result<Limit, ConfigError> {
    let name = l.required_string("name")?;
    if name.is_empty() {
        return Err(l.path.field("name").error("must not be empty"));
    }
    let key_text = l.string("key")?.ok_or_else(|| {
        l.path
            .field("key")
            .error("is required (use \"\" for one global counter)")
    })?;
    let key = Template::parse(key_text).map_err(|e| l.path.field("key").error(e))?;
    let when = l.object("when")?.map(condition).transpose()?;
    let own_rates = rates(&mut l)?;
    let values_path = l.path.field("values");
    let rates = match (own_rates, l.array("values")?) {
        (Some(_), Some(_)) => {
            return Err(values_path.error("give either rates on the limit or `values`, not both"))
        }
        (Some(r), None) => LimitRates::Fixed(r),
        (None, None) => LimitRates::ServiceOwned,
        (None, Some(items)) if items.is_empty() => {
            return Err(values_path.error("is empty: list at least one value rule"))
        }
        (None, Some(items)) => LimitRates::PerValue(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| value_rule(Object::new(values_path.index(i), v)?))
                .collect::<Result<_, _>>()?,
        ),
    };
    l.finish()?;
    Ok(Limit {
        name: name.to_string(),
        key,
        rates,
        exclusive: false,
        when,
    })
}

fn value_rule(mut v: Object<'_>) -> Result<ValueRule, ConfigError> {
    let pattern = v.required_string("match")?;
    let match_path = v.path.field("match");
    let matcher = if pattern == "*" {
        ValueMatch::Any
    } else if let Some(re) = pattern.strip_prefix("regexp:") {
        ValueMatch::Regex(regex(&match_path, re)?)
    } else if let Ok(net) = pattern.parse::<IpNet>() {
        ValueMatch::Ip(net)
    } else if let Ok(ip) = pattern.parse::<std::net::IpAddr>() {
        ValueMatch::Ip(IpNet::from(ip))
    } else {
        ValueMatch::Exact(pattern.to_string())
    };
    let rates = rates(&mut v)?.ok_or_else(|| {
        v.path
            .error("needs `tokens` + `window` or `rates` for the values it matches")
    })?;
    let shared = v.bool("shared")?.unwrap_or(false);
    v.finish()?;
    Ok(ValueRule {
        matcher,
        pattern: pattern.to_string(),
        rates,
        shared,
    })
}

fn usage(mut u: Object<'_>) -> Result<(Count, OnMissing), ConfigError> {
    let count_path = u.path.field("count");
    let count = match u.value("count") {
        None => Count::Total,
        Some(Value::String(s)) => match s.as_str() {
            "total" => Count::Total,
            "prompt" => Count::Prompt,
            "completion" => Count::Completion,
            other => {
                return Err(count_path.error(format!(
                    "\"{other}\" is not one of \"total\", \"prompt\", \"completion\" or {{\"prompt\": w, \"cached_prompt\": w, \"completion\": w}}"
                )))
            }
        },
        Some(v @ Value::Object(_)) => {
            let mut w = Object::new(count_path.clone(), v)?;
            let mut weight = |name: &'static str| -> Result<Option<f64>, ConfigError> {
                match w.value(name) {
                    None => Ok(None),
                    Some(Value::Number(n)) => match n.as_f64() {
                        Some(f) if f.is_finite() && (0.0..=1_000_000.0).contains(&f) => Ok(Some(f)),
                        _ => Err(count_path.field(name).error("must be a weight between 0 and 1000000")),
                    },
                    Some(other) => Err(count_path.field(name).error(format!("expected a number, found {}", kind(other)))),
                }
            };
            let prompt = weight("prompt")?.unwrap_or(0.0);
            let cached_prompt = weight("cached_prompt")?.unwrap_or(prompt);
            let completion = weight("completion")?.unwrap_or(0.0);
            w.finish()?;
            Count::Weighted {
                prompt,
                cached_prompt,
                completion,
            }
        }
        Some(other) => return Err(count_path.error(format!("expected a string or an object, found {}", kind(other)))),
    };
    let on_missing = match u.string("on_missing")? {
        None | Some("estimate") => OnMissing::Estimate,
        Some("zero") => OnMissing::Zero,
        Some(other) => {
            return Err(u
                .path
                .field("on_missing")
                .error(format!("\"{other}\" is not one of \"estimate\", \"zero\"")))
        }
    };
    u.finish()?;
    Ok((count, on_missing))
}

fn deny(mut d: Object<'_>) -> Result<DenyConfig, ConfigError> {
    let status = status(&mut d, "status")?.unwrap_or(429);
    let body = d.string("body")?.map(str::to_string);
    let headers = match d.object("headers")? {
        None => Vec::new(),
        Some(h) => h
            .entries()
            .map(|(name, v)| {
                let path = h.path.field(name);
                if !valid_header_name(name) || name.starts_with(':') {
                    return Err(path.error("is not a valid header name"));
                }
                match v {
                    Value::String(s) if !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) => {
                        Ok((name.to_ascii_lowercase(), s.clone()))
                    }
                    Value::String(_) => Err(path.error("must not contain CR, LF or NUL")),
                    other => Err(path.error(format!("expected a string, found {}", kind(other)))),
                }
            })
            .collect::<Result<_, _>>()?,
    };
    d.finish()?;
    Ok(DenyConfig {
        status,
        body,
        headers,
    })
}

fn client_ip(mut c: Object<'_>) -> Result<ClientIpSource, ConfigError> {
    let source = c.string("source")?;
    let header = header_name(&mut c, "header")?;
    let hops = c.u64_max("trusted_hops", 64)?;
    let result = match (source, header) {
        (Some(_), Some(_)) => return Err(c.path.field("header").error("give either `source` or `header`, not both")),
        (None | Some("remote"), None) => {
            if hops.is_some() {
                return Err(c.path.field("trusted_hops").error("only goes with `header`"));
            }
            ClientIpSource::Remote
        }
        (Some(other), None) => {
            return Err(c.path.field("source").error(format!("\"{other}\" is not \"remote\"; to read a header use {{\"header\": \"x-forwarded-for\", \"trusted_hops\": 1}}")))
        }
        (None, Some(name)) => match hops {
            Some(0) => return Err(c.path.field("trusted_hops").error("must be at least 1 (1 is the right-most entry)")),
            hops => ClientIpSource::Header { name, trusted_hops: hops.unwrap_or(1) as usize },
        },
    };
    c.finish()?;
    Ok(result)
}
