//! The validated configuration: what every shape (native, ASM, Higress) is read into, so the
//! request path never needs to know which dialect the operator wrote.

use thiserror::Error;

use super::scope::{Scope, ScopeFacts};
use crate::client_ip::{ClientIpSource, Prefixes};
use crate::limits::Limit;
use crate::matcher::RequestMatch;

pub use crate::usage::{Count, OnMissing};

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
    /// `admission: "lease"`: requests for a key far from its limits are admitted under quota
    /// leases the VM holds, without a check each (protocol v1).
    pub leases: bool,
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
/// `reserve.min` unless configured: the least output cap a trimmed request is served with.
pub const DEFAULT_TRIM_MIN: u64 = 256;

/// `stream_drain_ms` when not given: long enough for an upstream that honours the cap to end
/// on its own, short enough that a runaway one costs little.
pub const DEFAULT_STREAM_DRAIN_MS: u64 = 5_000;

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
    /// `reserve.max`: the largest reserve a check may ask. Not set (0) until the builder's
    /// `finish` gives it its default: the wire's bound, or [`RLS_RESERVE_MAX`] under envoy-rls.
    pub reserve_max: u64,
    /// `reserve.default`: what a request that states no output cap (or whose body cannot be
    /// read) reserves under `"max_tokens"`.
    pub reserve_default: u64,
    /// `reserve.write_cap`: write the reserved cap into the request, so the upstream cannot
    /// produce more than was reserved.
    pub write_cap: bool,
    /// `reserve.trim`: the least output cap per choice worth serving when the request's own
    /// does not fit (`reserve.min`); `None`: a request that does not fit is refused.
    pub trim_min: Option<u64>,
    pub inject_stream_usage: bool,
    /// `stream_cutoff`: end a stream whose charge passes what its budget had for it at
    /// admission (always on under `reserve.trim`).
    pub stream_cutoff: bool,
    /// `stream_drain_ms`: how long an ended stream's upstream may go on before it is reset.
    pub stream_drain_ms: u64,
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
    pub(super) needs_request_body: bool,
    /// Derived once at load: the headers `matches` read, taken out of the request's header map
    /// first, so that a request that matches nothing turns no other header into text.
    pub(super) match_headers: Vec<String>,
    /// Derived once at load: every request header a limited request's keys, conditions and
    /// accounting read (the only ones taken out of the request's header map).
    pub(super) request_headers: Vec<String>,
    /// Derived once at load: `request_headers` less those `matches` read (a matched request
    /// has them already).
    pub(super) headers_after_match: Vec<String>,
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

impl Config {
    /// The headers `matches` read (empty when every request matches).
    pub fn match_headers(&self) -> &[String] {
        &self.match_headers
    }

    /// The request headers a limited request's keys, conditions and accounting read.
    pub fn request_headers(&self) -> &[String] {
        &self.request_headers
    }

    /// The request headers a limited request reads beyond those its `matches` read.
    pub fn headers_after_match(&self) -> &[String] {
        &self.headers_after_match
    }

    /// Whether a response's `x-gemini-service-tier` can change what it costs (a price table
    /// with `service_tiers`).
    pub fn reads_tier(&self) -> bool {
        self.prices.as_ref().is_some_and(|p| !p.tiers.is_empty())
    }

    /// Whether the JSON request body must be read before the check can be made.
    pub fn needs_request_body(&self) -> bool {
        self.needs_request_body
    }
}
