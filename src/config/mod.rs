//! The validated configuration model, and the entry point that reads any accepted shape into it.
//!
//! Every shape (native, ASM, Higress) ends up as [`Config`]s, so the request path never needs to
//! know which dialect the operator wrote. A [`Plugin`] holds one, or with Higress `_rules_` one
//! per scope (route, domain, upstream service).

mod asm;
mod de;
mod higress;
mod native;
mod options;
#[cfg(feature = "schema")]
pub mod schema;
mod scope;
mod values;

pub use scope::{Scope, ScopeFacts};

use std::cell::RefCell;

use thiserror::Error;

use de::{Path, Unknown};

use crate::client_ip::{ClientIpSource, Prefixes};
use crate::limits::Limit;
use crate::matcher::RequestMatch;
use crate::template::Attribute;

/// A configuration problem, naming the field (`limits[1].window`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid plugin configuration: `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// Which wire protocol the rate-limit service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON `/v1/check` and `/v1/report` (DESIGN section 3).
    V1,
    /// The ASM example service's `/ratelimit` and `/update_ratelimit_record` (section 4).
    Asm,
    /// Envoy's rate-limit gRPC service (envoyproxy/ratelimit, Limitador).
    EnvoyRls,
}

/// What a failed check (service down, slow, broken) does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The Envoy cluster `dispatch_http_call` targets.
    pub cluster: String,
    /// The `:authority` sent to the service.
    pub authority: String,
    pub protocol: Protocol,
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
    pub failure_status: u32,
    /// `envoy-rls`: the rate-limit domain.
    pub domain: String,
    /// `envoy-rls`: entries put before `(limit, value)` in every descriptor.
    pub descriptor_entries: Vec<(String, String)>,
    /// Sent on every call as `authorization: Bearer <key>` (gRPC metadata under envoy-rls).
    pub api_key: Option<String>,
}

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

/// Tokens taken from every budget when a request is admitted, before its usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Tokens(u64),
    /// The request's own `max_tokens` (or `max_completion_tokens` / `max_output_tokens`).
    MaxTokens,
}

/// `reserve.default` unless configured: what a request without an output cap reserves.
pub const DEFAULT_RESERVE: u64 = 4096;

/// `reserve.max` under envoy-rls unless configured. envoyproxy/ratelimit counts a check's hits
/// even when it answers OVER_LIMIT, so one request asking for 10^12 tokens would otherwise spend
/// a shared counter's whole window.
pub const RLS_RESERVE_MAX: u64 = 4096;

/// The reply to a denied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyConfig {
    pub status: u32,
    /// `None` → an OpenAI-style error JSON (or the ASM service's description).
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    /// Empty: every request is limited.
    pub matches: Vec<RequestMatch>,
    pub limits: Vec<Limit>,
    pub count: Count,
    pub on_missing: OnMissing,
    pub reserve: Reserve,
    /// `reserve.max`: the largest reserve a check may ask. Not set (0) until [`Config::derive`]
    /// gives it its default: the wire's bound, or [`RLS_RESERVE_MAX`] under envoy-rls.
    pub reserve_max: u64,
    /// `reserve.default`: what a request that states no output cap (or whose body cannot be
    /// read) reserves under `"max_tokens"`.
    pub reserve_default: u64,
    /// `reserve.write_cap`: write the reserved cap into the request, so the upstream cannot
    /// produce more than was reserved.
    pub write_cap: bool,
    pub inject_stream_usage: bool,
    pub deny: DenyConfig,
    pub quota_headers: bool,
    /// Also Higress's `X-TokenRateLimit-*` headers (its `show_limit_quota_header`).
    pub higress_headers: bool,
    pub client_ip: ClientIpSource,
    /// How much of a client address is one client in keys (`client_ip.ipv4_prefix`,
    /// `client_ip.ipv6_prefix`).
    pub client_ip_prefixes: Prefixes,
    /// Lower-case header name carrying the authenticated consumer.
    pub consumer_header: String,
    pub max_request_body_bytes: usize,
    /// `max_pending_reports`: distinct keys waiting in the VM's report queue.
    pub max_pending_reports: usize,
    /// What each model costs, for limits that count money.
    pub prices: Option<crate::pricing::Prices>,
    /// Derived once at load: the hot path asks it on every matched request.
    needs_request_body: bool,
    /// Derived once at load: the headers `matches` read, fetched alone so that a request that
    /// matches nothing costs a few header lookups.
    match_headers: Vec<String>,
    /// Derived once at load: every request header a limited request's keys, conditions and
    /// accounting read, asked for by name (a header map is never read whole).
    request_headers: Vec<String>,
}

/// Which dialect a configuration is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Native,
    /// Alibaba Cloud ASM's LLM token rate limiting (`rateLimitKeys`, `rateLimitService`).
    Asm,
    /// Higress `ai-token-ratelimit` (`rule_name`, `rule_items`, `global_threshold`, `_rules_`).
    Higress,
}

impl Shape {
    /// Recognises the shape by its distinctive top-level fields.
    pub fn of(value: &serde_json::Value) -> Shape {
        let has = |k: &str| value.get(k).is_some();
        if ["rule_name", "rule_items", "global_threshold", "_rules_"]
            .iter()
            .any(|k| has(k))
        {
            Shape::Higress
        } else if has("rateLimitKeys") || has("rateLimitService") {
            Shape::Asm
        } else {
            Shape::Native
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Shape::Native => "native",
            Shape::Asm => "ASM",
            Shape::Higress => "Higress",
        }
    }
}

/// A configuration and the requests it applies to (`None`: every request no scope claims).
#[derive(Debug, Clone)]
pub struct Policy {
    pub scope: Option<Scope>,
    pub config: Config,
}

/// The whole plugin configuration as loaded.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub shape: Shape,
    /// Scoped policies first, in order; the unscoped default (if any) last.
    pub policies: Vec<Policy>,
    /// Fields of a foreign shape that this plugin does not use, to log at load.
    pub warnings: Vec<String>,
}

impl Plugin {
    /// Reads the plugin configuration as Envoy hands it over, in any shape.
    pub fn parse(bytes: &[u8]) -> Result<Plugin, ConfigError> {
        let value = json(bytes)?;
        let shape = Shape::of(&value);
        let root = Path::root();
        let warnings = RefCell::new(Vec::new());
        let mut policies = match shape {
            Shape::Native => vec![Policy {
                scope: None,
                config: read_native(&value)?,
            }],
            Shape::Asm => {
                let (asm, options) = read_with_options::<asm::Asm>(&value, &root, &[], &warnings)?;
                let mut config = asm.into_config(&root)?;
                options.apply(&root, &mut config)?;
                vec![Policy {
                    scope: None,
                    config,
                }]
            }
            Shape::Higress => higress::parse(&value, &warnings)?,
        };
        for p in &mut policies {
            p.config.derive();
        }
        let mut warnings = warnings.into_inner();
        if policies
            .first()
            .is_some_and(|p| p.config.service.protocol == Protocol::EnvoyRls)
        {
            warnings.push("`service.protocol`: \"envoy-rls\": an engine that refuses hits past a limit (Limitador) cannot record a report that crosses it; the plugin then sends what still fits, so the budget ends spent, and the tokens beyond go uncharged (metric tokens_over_limit). envoyproxy/ratelimit records them".into());
        }
        // Only the v1 service names the limit that denied.
        for p in &policies {
            if p.config.service.protocol == Protocol::V1 {
                continue;
            }
            if let Some(l) = p.config.limits.iter().find(|l| l.deny_status.is_some()) {
                warnings.push(format!(
                    "limit `{}`: `deny_status` is not used: under protocol \"{}\" the service's answer names no limit, so every denial has `deny.status`",
                    l.name,
                    if p.config.service.protocol == Protocol::Asm { "asm" } else { "envoy-rls" }
                ));
            }
        }
        Ok(Plugin {
            shape,
            policies,
            warnings,
        })
    }

    /// The rate-limit service every policy reports to (they are checked to agree at load).
    pub fn service(&self) -> Option<&ServiceConfig> {
        self.policies.first().map(|p| &p.config.service)
    }

    /// The policy for a request: the first scope that claims it, else the default.
    pub fn select(&self, facts: &mut impl ScopeFacts) -> Option<usize> {
        self.policies.iter().position(|p| match &p.scope {
            None => true,
            Some(scope) => scope.matches(facts),
        })
    }

    /// How many distinct keys the VM's report queue holds (the largest any policy asks).
    pub fn max_pending_reports(&self) -> usize {
        self.policies
            .iter()
            .map(|p| p.config.max_pending_reports)
            .max()
            .unwrap_or(crate::report::DEFAULT_CAPACITY)
    }

    pub fn config(&self, policy: usize) -> Option<&Config> {
        self.policies.get(policy).map(|p| &p.config)
    }
}

/// Reads an object of a foreign shape in two passes: the shared options, then the shape's own
/// fields, with `also` the fields a third pass reads. Fields none of them reads are warned about.
fn read_with_options<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    path: &Path,
    also: &[&'static str],
    warnings: &RefCell<Vec<String>>,
) -> Result<(T, options::Options), ConfigError> {
    de::object(path, value)?;
    let (options, option_fields) = de::read::<options::Options>(value, path, &[], Unknown::Ignore)?;
    let others: Vec<&'static str> = option_fields.iter().chain(also).copied().collect();
    let (shape, _) = de::read::<T>(value, path, &others, Unknown::Warn(warnings))?;
    Ok((shape, options))
}

/// The native shape: its own fields and the options, every other field refused.
fn read_native(value: &serde_json::Value) -> Result<Config, ConfigError> {
    let root = Path::root();
    de::object(&root, value)?;
    let (options, option_fields) =
        de::read::<options::Options>(value, &root, &[], Unknown::Ignore)?;
    let (native, _) = de::read::<native::Native>(value, &root, option_fields, Unknown::Ignore)?;
    let mut config = native.into_config(&root)?;
    options.apply(&root, &mut config)?;
    Ok(config)
}

fn json(bytes: &[u8]) -> Result<serde_json::Value, ConfigError> {
    let root = Path::root();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(root
            .error("the plugin configuration is empty; it needs at least `service` and `limits`"));
    }
    serde_json::from_slice(bytes).map_err(|e| root.error(format!("not valid JSON: {e}")))
}

impl Config {
    /// Reads a configuration in the native shape (tests and tools; Envoy's goes through
    /// [`Plugin::parse`]).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut config = read_native(&json(bytes)?)?;
        config.derive();
        Ok(config)
    }

    /// A configuration with these limits and every option at its default.
    fn new(service: ServiceConfig, matches: Vec<RequestMatch>, limits: Vec<Limit>) -> Config {
        Config {
            service,
            matches,
            limits,
            count: Count::Total,
            on_missing: OnMissing::Estimate,
            reserve: Reserve::Tokens(0),
            reserve_max: 0,
            reserve_default: DEFAULT_RESERVE,
            write_cap: false,
            inject_stream_usage: true,
            deny: DenyConfig {
                status: 429,
                body: None,
                headers: Vec::new(),
            },
            quota_headers: true,
            higress_headers: false,
            client_ip: ClientIpSource::Remote,
            client_ip_prefixes: Prefixes::default(),
            consumer_header: "x-mse-consumer".into(),
            max_request_body_bytes: 1024 * 1024,
            max_pending_reports: crate::report::DEFAULT_CAPACITY,
            prices: None,
            needs_request_body: false,
            match_headers: Vec::new(),
            request_headers: Vec::new(),
        }
    }

    /// Computes what the hot path asks on every request.
    fn derive(&mut self) {
        if self.reserve_max == 0 {
            self.reserve_max = match self.service.protocol {
                Protocol::EnvoyRls => RLS_RESERVE_MAX,
                _ => native::MAX_TOKENS,
            };
        }
        let mut names: Vec<String> = Vec::new();
        for name in self.matches.iter().flat_map(RequestMatch::header_names) {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        self.match_headers = names;
        // What the shell itself reads (the body's size, usage injection's route) and what
        // every key and condition reads.
        let mut read: Vec<String> = [":method", ":path", "content-length"]
            .map(String::from)
            .into();
        for limit in &self.limits {
            let attributes = limit
                .key
                .attributes()
                .chain(limit.when.iter().flat_map(|c| c.attributes()));
            for attr in attributes {
                let name =
                    crate::request::headers_read(attr, &self.client_ip, &self.consumer_header);
                if let Some(name) = name.filter(|n| !read.iter().any(|r| r == n)) {
                    read.push(name.to_string());
                }
            }
        }
        self.request_headers = read;
        self.needs_request_body = self.reserve == Reserve::MaxTokens
            || self.limits.iter().any(|l| {
                // A limit in money prices the request's model.
                l.currency.is_some()
                    || l.key.attributes().any(|a| *a == Attribute::Model)
                    || l.when.as_ref().is_some_and(|c| c.reads_model())
            });
    }

    /// The headers `matches` read (empty when every request matches).
    pub fn match_headers(&self) -> &[String] {
        &self.match_headers
    }

    /// The request headers a limited request's keys, conditions and accounting read.
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    /// Whether the JSON request body must be read before the check can be made.
    pub fn needs_request_body(&self) -> bool {
        self.needs_request_body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitRates;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes())
    }

    fn with_limits(limits: &str) -> String {
        format!(r#"{{"service": {{"cluster": "rl"}}, "limits": {limits}}}"#)
    }

    /// A valid minimal configuration plus `fields` at the top level.
    fn extra(fields: &str) -> String {
        format!(
            r#"{{"service": {{"cluster": "a"}}, "limits": [{{"name": "g", "key": ""}}], {fields}}}"#
        )
    }

    fn error(json: &str) -> String {
        parse(json)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("accepted: {json}"))
    }

    /// A long-context price, with its own defaults, in an entry of the price table.
    #[test]
    fn long_context_prices_are_read() {
        let c = parse(&extra(
            r#""prices": {"currency": "USD", "models": [{"model": "gemini-2.5-pro*", "input": "1.25", "output": "10.00",
                 "long_context": {"above_prompt_tokens": 200000, "input": "2.50", "output": "15.00"}}]}"#,
        ))
        .unwrap();
        let p = c
            .prices
            .as_ref()
            .unwrap()
            .price(Some("gemini-2.5-pro-002"), None)
            .unwrap();
        let l = p.long_context.unwrap();
        assert_eq!(
            (
                l.above_prompt_tokens,
                l.rates.input,
                l.rates.output,
                l.rates.cache_write
            ),
            (200_000, 2_500_000, 15_000_000, 3_125_000)
        );
        let err = parse(&extra(
            r#""prices": {"currency": "USD", "models": [{"model": "m", "input": "1", "output": "1",
                 "long_context": {"input": "2", "output": "2"}}]}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("above_prompt_tokens"), "{err}");
    }

    #[test]
    fn design_example_parses() {
        let c = parse(
            r#"{
            "service": {"host": "ratelimit.default.svc.cluster.local", "port": 80, "protocol": "v1",
                        "timeout_ms": 500, "failure_mode": "allow", "failure_status": 503},
            "matches": [{"host": {"exact": "api.openai.com"}, "path": {"prefix": "/v1/"}, "method": "POST",
                         "headers": {"x-tier": {"regex": "free|trial"}}}],
            "limits": [
              {"name": "per-key", "key": "{{request.headers.authorization}}", "tokens": 10000, "window": "1m"},
              {"name": "apikey", "key": "{{request.query.apikey}}", "values": [
                 {"match": "9a342114-ba8a-11ec-b1bf-00163e1250b5", "tokens": 10, "window": "1m"},
                 {"match": "regexp:^a.*", "rates": [{"tokens": 10, "window": "1s"}, {"tokens": 5000, "window": "1d"}]},
                 {"match": "*", "tokens": 1000, "window": "1h"}]},
              {"name": "ip", "key": "{{source.ip}}", "values": [{"match": "10.0.0.0/8", "tokens": 100000, "window": "1d", "shared": true}]},
              {"name": "model", "key": "{{llm.model}}", "tokens": 50000, "window": "1m"},
              {"name": "global", "key": "", "tokens": 1000000, "window": "1m"},
              {"name": "user-type", "key": "{{request.headers.user-type}}"}
            ],
            "usage": {"count": {"prompt": 1, "completion": 4}, "on_missing": "zero"},
            "reserve": {"tokens": "max_tokens"},
            "inject_stream_usage": true,
            "deny": {"status": 429, "body": null, "headers": {}},
            "quota_headers": true,
            "client_ip": {"header": "x-forwarded-for", "trusted_hops": 1},
            "consumer_header": "x-mse-consumer",
            "max_request_body_bytes": 1048576
        }"#,
        )
        .unwrap();
        assert_eq!(
            c.service.cluster,
            "outbound|80||ratelimit.default.svc.cluster.local"
        );
        assert_eq!(c.service.authority, "ratelimit.default.svc.cluster.local");
        assert_eq!(c.limits.len(), 6);
        assert!(matches!(c.limits[5].rates, LimitRates::ServiceOwned));
        assert_eq!(
            c.count,
            Count::Weighted {
                prompt: 1.0,
                cached_prompt: 1.0,
                completion: 4.0
            }
        );
        assert_eq!(c.on_missing, OnMissing::Zero);
        assert_eq!(c.reserve, Reserve::MaxTokens);
        assert!(c.needs_request_body());
        assert_eq!(
            c.client_ip,
            ClientIpSource::Header {
                name: "x-forwarded-for".into(),
                trusted_hops: 1
            }
        );
    }

    #[test]
    fn defaults() {
        let c = parse(&with_limits(r#"[{"name": "g", "key": ""}]"#)).unwrap();
        assert_eq!(c.service.protocol, Protocol::V1);
        assert_eq!(c.service.timeout_ms, 500);
        assert_eq!(c.service.failure_mode, FailureMode::Allow);
        assert_eq!(c.service.failure_status, 503);
        assert_eq!(
            c.deny,
            DenyConfig {
                status: 429,
                body: None,
                headers: vec![]
            }
        );
        assert_eq!(c.reserve, Reserve::Tokens(0));
        assert!(c.quota_headers && c.inject_stream_usage && !c.needs_request_body());
        assert_eq!(c.consumer_header, "x-mse-consumer");
        assert_eq!(c.max_request_body_bytes, 1 << 20);
        assert_eq!(c.client_ip, ClientIpSource::Remote);
        assert_eq!(c.client_ip_prefixes, Prefixes { v4: 32, v6: 64 });
        let c = parse(
            r#"{"service": {"cluster": "rl"}, "limits": [{"name": "g", "key": ""}],
                "client_ip": {"ipv4_prefix": 24, "ipv6_prefix": 128}}"#,
        )
        .unwrap();
        assert_eq!(c.client_ip_prefixes, Prefixes { v4: 24, v6: 128 });
    }

    /// Under envoy-rls a `window` alone declares the engine's window (in seconds), for the
    /// retry of a denial the engine dates nothing of.
    #[test]
    fn an_envoy_rls_limit_may_declare_its_window() {
        let c = parse(
            r#"{"service": {"cluster": "a", "protocol": "envoy-rls", "domain": "d"},
                "limits": [{"name": "g", "key": "", "window": "1h"}, {"name": "u", "key": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(c.limits[0].engine_window_s, Some(3600));
        assert_eq!(c.limits[1].engine_window_s, None);
        assert!(matches!(c.limits[0].rates, LimitRates::ServiceOwned));
        // Its answers name no limit: a `deny_status` there is said to be unused.
        let p = Plugin::parse(
            br#"{"service": {"cluster": "a", "protocol": "envoy-rls", "domain": "d"},
                "limits": [{"name": "g", "key": "", "deny_status": 403}]}"#,
        )
        .unwrap();
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("`deny_status` is not used")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn limits_may_carry_conditions() {
        use crate::limits::descriptors;
        use crate::template::{Attribute, AttributeSource};
        use std::borrow::Cow;
        let c = Config::parse(
            br#"{"service": {"cluster": "rl"}, "limits": [
              {"name": "gpt4o-per-user", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1h",
               "when": {"model": {"exact": "gpt-4o"}, "path": {"prefix": "/v1/chat/"}}},
              {"name": "tagged", "key": "", "tokens": 100, "window": "1h",
               "when": {"headers": {"x-team": {"present": true}}, "method": "POST"}}]}"#,
        )
        .unwrap();
        assert!(c.needs_request_body(), "a model condition reads the body");
        struct Req(&'static str, &'static str, Option<&'static str>);
        impl AttributeSource for Req {
            fn attribute(&self, a: &Attribute) -> Option<Cow<'_, str>> {
                match a {
                    Attribute::Model => Some(Cow::Borrowed(self.0)),
                    Attribute::Path => Some(Cow::Borrowed(self.1)),
                    Attribute::Method => Some(Cow::Borrowed("POST")),
                    Attribute::Header(h) if h == "x-user" => Some(Cow::Borrowed("ann")),
                    Attribute::Header(h) if h == "x-team" => self.2.map(Cow::Borrowed),
                    _ => None,
                }
            }
        }
        let names = |r: Req| -> Vec<String> {
            descriptors(&c.limits, &r)
                .into_iter()
                .map(|d| d.limit)
                .collect()
        };
        assert_eq!(
            names(Req("gpt-4o", "/v1/chat/completions", None)),
            ["gpt4o-per-user"]
        );
        assert_eq!(
            names(Req("gpt-4o-mini", "/v1/chat/completions", None)),
            Vec::<String>::new()
        );
        assert_eq!(names(Req("gpt-4o", "/v1/embeddings", Some(""))), ["tagged"]);
        // The README's "a model and its dated snapshots" condition.
        let snapshots = Config::parse(
            br#"{"service": {"cluster": "rl"}, "limits": [{"name": "gpt4o", "key": "", "tokens": 1, "window": "1h",
               "when": {"model": {"regex": "^gpt-4o(-[0-9]{4}-[0-9]{2}-[0-9]{2})?$"}}}]}"#,
        )
        .unwrap();
        for (model, limited) in [
            ("gpt-4o", true),
            ("gpt-4o-2024-08-06", true),
            ("gpt-4o-mini", false),
        ] {
            let r = Req(model, "/v1/chat/completions", None);
            assert_eq!(
                !descriptors(&snapshots.limits, &r).is_empty(),
                limited,
                "{model}"
            );
        }
        for (body, message) in [
            (
                r#"{"service": {"cluster": "rl"}, "limits": [{"name": "a", "key": "", "when": {"modle": {}}}]}"#,
                "`limits[0].when.modle`: unknown field",
            ),
            (
                r#"{"service": {"cluster": "rl"}, "limits": [{"name": "a", "key": "", "when": {"headers": {"x": {"present": false}}}}]}"#,
                "`limits[0].when.headers.x.present`: can only be true",
            ),
        ] {
            let err = Config::parse(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("", "`(root)`: the plugin configuration is empty"),
            ("{", "`(root)`: not valid JSON"),
            ("[]", "`(root)`: expected an object, found an array"),
            (r#"{"limits": []}"#, "`service`: is required"),
            (
                r#"{"service": {}, "limits": []}"#,
                "`service`: needs `cluster`",
            ),
            (
                r#"{"service": {"cluster": "a", "host": "b"}, "limits": []}"#,
                "`service.host`: give either",
            ),
            (
                r#"{"service": {"cluster": "a", "protocol": "grpc"}, "limits": []}"#,
                "`service.protocol`: \"grpc\" is not one of",
            ),
            (
                r#"{"service": {"cluster": "a", "timeout_ms": 0}, "limits": []}"#,
                "`service.timeout_ms`: must be at least 1",
            ),
            (
                r#"{"service": {"cluster": "a", "failure_mode": "open"}, "limits": []}"#,
                "`service.failure_mode`",
            ),
            (
                r#"{"service": {"cluster": "a", "failure_status": 42}, "limits": []}"#,
                "`service.failure_status`: 42 is not an HTTP status",
            ),
            (r#"{"service": {"cluster": "a"}}"#, "`limits`: is required"),
            (&with_limits("[]"), "`limits`: is empty"),
            (
                &with_limits(r#"[{"key": ""}]"#),
                "`limits[0].name`: is required",
            ),
            (
                &with_limits(r#"[{"name": "a"}]"#),
                "`limits[0].key`: is required",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "{{x"}]"#),
                "`limits[0].key`: unclosed",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": ""}, {"name": "a", "key": ""}]"#),
                "`limits[1].name`: `a` is used by another limit",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": 0, "window": "1m"}]"#),
                "`limits[0].tokens`: must be at least 1",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": -1, "window": "1m"}]"#),
                "`limits[0].tokens`: expected a non-negative whole number, found -1",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": 1.5, "window": "1m"}]"#),
                "`limits[0].tokens`: expected a non-negative whole number, found 1.5",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": 5}]"#),
                "`limits[0].window`: is required",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": 5, "window": "1w"}]"#),
                "`limits[0].window`: \"1w\" is not a window",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "tokens": 5, "window": 0}]"#),
                "`limits[0].window`: must be at least one second",
            ),
            (
                &with_limits(
                    r#"[{"name": "a", "key": "", "tokens": 5, "window": "1m", "rates": []}]"#,
                ),
                "`limits[0].rates`: give either",
            ),
            (
                &with_limits(
                    r#"[{"name": "a", "key": "", "rates": [{"tokens": 1, "window": "1m", "burst": 2}]}]"#,
                ),
                "`limits[0].rates[0].burst`: unknown field",
            ),
            (
                &with_limits(r#"[{"name": "a", "key": "", "values": [{"match": "x"}]}]"#),
                "`limits[0].values[0]`: needs `tokens`",
            ),
            (
                &with_limits(
                    r#"[{"name": "a", "key": "", "values": [{"match": "regexp:(", "tokens": 1, "window": 1}]}]"#,
                ),
                "`limits[0].values[0].match`: invalid regular expression",
            ),
            (
                &with_limits(
                    r#"[{"name": "a", "key": "", "tokens": 1, "window": 1, "values": [{"match": "*", "tokens": 1, "window": 1}]}]"#,
                ),
                "`limits[0].values`: give either",
            ),
            (
                r#"{"service": {"cluster": "a", "api_key": "two words"}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.api_key`: must be visible ASCII characters only",
            ),
            (
                r#"{"service": {"cluster": "a", "api_key": ""}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.api_key`: must not be empty",
            ),
            (
                &extra(r#""reserve": {"tokens": "max_tokens", "default": 0}"#),
                "`reserve.default`",
            ),
            (
                &extra(r#""matches": [{"path": {"prefix": "/", "exact": "/"}}]"#),
                "`matches[0].path`: names exact and prefix at once",
            ),
            (
                &extra(r#""matches": [{"headers": {"x": {"regex": "["}}}]"#),
                "`matches[0].headers.x.regex`: invalid regular expression",
            ),
            (
                &extra(r#""usage": {"count": "all"}"#),
                "`usage.count`: \"all\" is not one of",
            ),
            (
                &extra(r#""reserve": {"tokens": "lots"}"#),
                "`reserve.tokens`: expected a number of tokens or \"max_tokens\"",
            ),
            (&extra(r#""deny": {"status": 99}"#), "`deny.status`"),
            (
                &extra(r#""deny": {"headers": {"x": "a\nb"}}"#),
                "`deny.headers.x`: must not contain CR, LF or NUL",
            ),
            (
                &extra(r#""client_ip": {"header": "x-forwarded-for", "trusted_hops": 0}"#),
                "`client_ip.trusted_hops`: must be at least 1",
            ),
            (
                &extra(r#""consumer_header": "bad header""#),
                "`consumer_header`: \"bad header\" is not a valid header name",
            ),
            (
                &extra(r#""max_request_body_bytes": 0"#),
                "`max_request_body_bytes`: must be at least 1",
            ),
            (
                &extra(r#""quota_headers": "yes""#),
                "`quota_headers`: expected true or false",
            ),
            (&extra(r#""limts": []"#), "`limts`: unknown field"),
            // A misspelt option is refused with the options among what is expected.
            (
                &extra(r#""quota_header": true"#),
                "`quota_header`: unknown field; expected one of: service, matches, limits, usage, reserve",
            ),
            // serde would build a struct from an array by position; an object is required.
            (
                r#"{"service": ["rl"], "limits": [{"name": "g", "key": ""}]}"#,
                "`service`: expected an object, found an array",
            ),
            (
                &with_limits(
                    r#"[{"name": "a", "key": "", "rates": [{"tokens": 1, "window": 1}, {"tokens": 1, "window": "soon"}]}]"#,
                ),
                "`limits[0].rates[1].window`: \"soon\" is not a window",
            ),
            (
                &extra(r#""usage": {"count": {"prompt": -1}}"#),
                "`usage.count.prompt`: must be a weight between 0 and 1000000",
            ),
            (
                &extra(r#""usage": {"count": {"prompt": 1, "output": 2}}"#),
                "`usage.count.output`: unknown field",
            ),
            (
                &extra(r#""matches": [{"model": {"exact": "gpt-4o"}}]"#),
                "`matches[0].model`: only a limit's `when` may name the model",
            ),
            (
                &extra(r#""matches": [{"method": ["GET", 5]}]"#),
                "`matches[0].method[1]`: expected a string, found a number",
            ),
            (
                &extra(r#""client_ip": {"ipv6_prefix": 0}"#),
                "`client_ip.ipv6_prefix`",
            ),
            (
                &extra(r#""client_ip": {"ipv6_prefix": 129}"#),
                "`client_ip.ipv6_prefix`",
            ),
            (
                &extra(r#""client_ip": {"ipv4_prefix": 33}"#),
                "`client_ip.ipv4_prefix`",
            ),
            (
                &extra(r#""client_ip": {"header": "x-forwarded-for", "trusted_hops": 65}"#),
                "`client_ip.trusted_hops`: 65 is larger than the maximum 64",
            ),
            (
                r#"{"service": {"cluster": "a", "protocol": "envoy-rls"}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.domain`: is required with protocol \"envoy-rls\"",
            ),
            (
                r#"{"service": {"cluster": "a", "domain": "d"}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.domain`: only goes with protocol \"envoy-rls\"",
            ),
            (
                r#"{"service": {"cluster": "a", "protocol": "envoy-rls", "domain": "d"}, "limits": [{"name": "g", "key": "", "tokens": 5, "window": 60}]}"#,
                "`limits[0]`: has rates or values, but with protocol \"envoy-rls\"",
            ),
            (
                r#"{"service": {"cluster": "a"}, "limits": [{"name": "g", "key": "", "window": 60}]}"#,
                "`limits[0].tokens`: is required with `window` (a `window` alone declares the engine's window, under protocol \"envoy-rls\" only)",
            ),
            (
                r#"{"service": {"cluster": "a", "protocol": "envoy-rls", "domain": "d"}, "limits": [{"name": "g", "key": "", "window": "month"}]}"#,
                "`limits[0].window`: alone declares the envoy-rls engine's window, which is a number of seconds",
            ),
        ];
        for (json, want) in cases {
            let got = error(json);
            assert!(
                got.contains(want),
                "for {json}\n  got:  {got}\n  want: {want}"
            );
        }
    }

    #[test]
    fn budgets_in_money_and_calendar_windows() {
        use wire::{Calendar, Period};
        let c = parse(
            r#"{"service": {"cluster": "rl"},
              "prices": {"currency": "USD", "unknown_model": "free", "models": [
                {"model": "gpt-4o", "input": "2.50", "cached_input": "1.25", "output": "10.00"},
                {"model": "gpt-4o-mini*", "input": 0.15, "output": 0.6}]},
              "limits": [
                {"name": "team", "key": "{{request.headers.x-team}}", "unit": "cost", "budget": "500.00", "window": "month", "timezone": "Asia/Shanghai"},
                {"name": "dev", "key": "{{request.headers.x-user}}", "unit": "cost", "rates": [{"budget": "20", "window": "month"}, {"budget": "2.5", "window": "1h"}]},
                {"name": "tpm", "key": "{{request.headers.x-user}}", "tokens": 20000, "window": "1m"},
                {"name": "daily", "key": "", "tokens": 1000000, "window": "day"}]}"#,
        )
        .unwrap();
        let rates = |i: usize| match &c.limits[i].rates {
            LimitRates::Fixed(r) => r.clone(),
            _ => panic!("{i}"),
        };
        let month_in = |zone: &str| {
            Some(Calendar {
                period: Period::Month,
                timezone: zone.into(),
            })
        };
        assert_eq!(c.limits[0].currency.as_deref(), Some("USD"));
        assert_eq!(rates(0)[0].tokens, 500_000_000);
        assert_eq!(rates(0)[0].calendar, month_in("Asia/Shanghai"));
        assert_eq!(rates(0)[0].window_s, Period::Month.longest_s());
        let dev = rates(1);
        assert_eq!(
            (dev[0].tokens, dev[0].calendar.clone()),
            (20_000_000, month_in("UTC"))
        );
        assert_eq!(
            (dev[1].tokens, dev[1].window_s, dev[1].calendar.clone()),
            (2_500_000, 3_600, None)
        );
        assert_eq!(c.limits[2].currency, None);
        assert_eq!(
            rates(3)[0].calendar.as_ref().map(|c| c.period),
            Some(Period::Day)
        );
        assert!(
            c.needs_request_body(),
            "a limit in money prices the request's model"
        );
        let prices = c.prices.as_ref().unwrap();
        assert_eq!(
            prices
                .price(Some("gpt-4o-mini-2024-07-18"), None)
                .map(|p| p.rates.output),
            Some(600_000)
        );
        assert_eq!(
            prices
                .price(None, Some("gpt-4o"))
                .map(|p| p.rates.cached_input),
            Some(1_250_000)
        );
        // Cache writes: 1.25× and 2× input unless given.
        let p = prices.price(None, Some("gpt-4o")).unwrap();
        assert_eq!(
            (p.rates.cache_write, p.rates.cache_write_1h),
            (3_125_000, 5_000_000)
        );
        assert_eq!(p.long_context, None);
        assert_eq!(
            prices.price(None, Some("llama")).map(|p| p.rates.input),
            Some(0)
        );

        let cost = |extra: &str, limit: &str| {
            format!(r#"{{"service": {{"cluster": "rl"}}, {extra} "limits": [{limit}]}}"#)
        };
        let table = r#""prices": {"currency": "USD", "models": [{"model": "m", "input": "1", "output": "2"}]},"#;
        for (json, want) in [
            (
                cost("", r#"{"name": "a", "key": "", "unit": "cost", "budget": "1", "window": "day"}"#),
                "`limits[0].unit`: \"cost\" needs a `prices` table",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "unit": "cost", "tokens": 5, "window": "day"}"#),
                "`limits[0].tokens`: a limit with \"unit\": \"cost\" counts money",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "budget": "5", "window": "day"}"#),
                "`limits[0].budget`: only goes with \"unit\": \"cost\"",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "unit": "cost", "budget": "20,00", "window": "day"}"#),
                "`limits[0].budget`: \"20,00\" is not an amount",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "unit": "cost", "budget": "0", "window": "day"}"#),
                "`limits[0].budget`: must be more than 0",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "unit": "cost", "rates": [{"budget": "1.0000001", "window": "day"}]}"#),
                "`limits[0].rates[0].budget`: \"1.0000001\" has more than six decimals",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "tokens": 1, "window": "monthly"}"#),
                "`limits[0].window`: \"monthly\" is not a window",
            ),
            (
                cost(table, r#"{"name": "a", "key": "", "tokens": 1, "window": "month", "timezone": "Asia Shanghai"}"#),
                "`limits[0].timezone`: \"Asia Shanghai\" is not an IANA time zone name",
            ),
            (
                cost(r#""prices": {"currency": "usd", "models": []},"#, r#"{"name": "a", "key": ""}"#),
                "`prices.currency`: \"usd\" is not a currency code",
            ),
            (
                cost(r#""prices": {"currency": "USD", "models": [{"input": "1", "output": "1"}]},"#, r#"{"name": "a", "key": ""}"#),
                "`prices.models[0].model`: is required",
            ),
            (
                cost(r#""prices": {"currency": "USD", "models": [{"model": "m", "input": "1"}]},"#, r#"{"name": "a", "key": ""}"#),
                "`prices.models[0].output`: is required",
            ),
            (
                cost(r#""prices": {"currency": "USD", "models": [], "unknown_model": "maybe"},"#, r#"{"name": "a", "key": ""}"#),
                "`prices.unknown_model`: expected \"deny\", \"free\" or {\"price\": {...}}, found \"maybe\"",
            ),
            (
                r#"{"service": {"cluster": "rl", "protocol": "asm"}, "prices": {"currency": "USD", "models": []},
                   "limits": [{"name": "a", "key": "", "unit": "cost", "budget": "1", "window": "day"}]}"#.to_string(),
                "`limits[0].unit`: \"cost\" needs protocol \"v1\"",
            ),
        ] {
            let got = error(&json);
            assert!(got.contains(want), "for {json}\n  got:  {got}\n  want: {want}");
        }
    }

    #[test]
    fn null_is_absent() {
        let c = parse(&extra(
            r#""reserve": null, "usage": {"count": null}, "matches": null"#,
        ))
        .unwrap();
        assert_eq!(c.reserve, Reserve::Tokens(0));
        assert_eq!(c.count, Count::Total);
        assert!(c.matches.is_empty());
    }

    #[test]
    fn windows() {
        for (text, seconds) in [
            ("\"1s\"", 1),
            ("\"1m\"", 60),
            ("\"1h\"", 3600),
            ("\"1d\"", 86400),
            ("\"90\"", 90),
            ("15", 15),
            ("\"5m\"", 300),
        ] {
            let c = parse(&with_limits(&format!(
                r#"[{{"name": "a", "key": "", "tokens": 1, "window": {text}}}]"#
            )))
            .unwrap();
            match &c.limits[0].rates {
                LimitRates::Fixed(r) => assert_eq!(r[0].window_s, seconds, "{text}"),
                _ => panic!("{text}"),
            }
        }
    }
}
