//! The Higress shape (`ai-token-ratelimit`, DESIGN section 2.3), read as Higress reads it and
//! translated into limits:
//!
//! * each `rule_items` entry is a limit keyed by its `limit_by_*` source, with one value rule
//!   per `limit_keys` entry (exact values for `limit_by_*`; `regexp:` or `*` for
//!   `limit_by_per_*`, each distinct value counted apart; addresses or CIDRs for
//!   `limit_by_per_ip`); `global_threshold` is one global limit;
//! * the global threshold is checked beside the items; of the items, the first that applies
//!   (`rule_items_match: "first"`, Higress before June 2026) or every one that applies
//!   (`"all"`, Higress since its PR #4011) is checked, and any one that is exhausted denies;
//! * `token_per_second|minute|hour|day` are rates; several in one entry are several rates;
//! * `rejected_code` (429) and `rejected_msg` (`Too many requests`) make the denial;
//!   `show_limit_quota_header` turns on the quota headers (off by default, as in Higress);
//! * `_rules_` entries (Higress `matchRules`) are policies scoped by `_match_route_`,
//!   `_match_domain_` and `_match_service_`; the top-level fields, when present, are the
//!   default for other requests.
//!
//! The counters live in the rate-limit service, so the config must name it (`service`, as in
//! the native shape; `_rules_` entries inherit the top-level one). The Higress `redis` block is
//! not used, and a config with one but no `service` is rejected with what to add. The native
//! options (`usage`, `reserve`, `client_ip`, …) may be added; other unknown top-level fields are
//! ignored with a warning.

use std::cell::RefCell;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use super::native::{Port, ServiceSpec, Tokens};
use crate::client_ip::ClientIpSource;
use crate::config::builder::Builder;
use crate::config::de::{self, each, Path};
use crate::config::foreign::read_with_options;
use crate::config::values::{HeaderName, Name, Pattern, Status};
use crate::config::*;
use crate::limits::Limit;
use crate::limits::{LimitRates, Rate, ValueMatch, ValueRule};
use crate::template::Template;

/// Higress accepts at most this many `rule_items`.
const MAX_RULE_ITEMS: usize = 10;

/// The top-level field listing scoped rules (Higress `matchRules`): each entry is a rule
/// configuration plus a [`ScopeSpec`].
pub const RULES: &str = "_rules_";

/// Which requests a `_rules_` entry applies to; at least one list is given.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScopeSpec {
    /// Route names (`xds.route_name`).
    #[serde(rename = "_match_route_")]
    routes: Option<Vec<Name>>,
    /// Hosts, exact or `*.suffix`.
    #[serde(rename = "_match_domain_")]
    domains: Option<Vec<Name>>,
    /// Upstream services: `host`, `host:port` or a cluster name.
    #[serde(rename = "_match_service_")]
    services: Option<Vec<Name>>,
}

impl ScopeSpec {
    fn into_scope(self, path: &Path) -> Result<Scope, ConfigError> {
        let names = |v: Option<Vec<Name>>| -> Vec<String> {
            v.unwrap_or_default().into_iter().map(|n| n.0).collect()
        };
        let scope = Scope {
            routes: names(self.routes),
            domains: names(self.domains)
                .into_iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            services: names(self.services),
        };
        if scope == Scope::default() {
            return Err(path.error(
                "needs `_match_route_`, `_match_domain_` or `_match_service_` (a list of names)",
            ));
        }
        Ok(scope)
    }
}

/// One Higress rule configuration: the top level, or one `_rules_` entry.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Rule {
    /// Names the rule; limits are called `<rule_name>.<source>`.
    rule_name: Option<Name>,
    /// The rate-limit service (a `_rules_` entry inherits the top-level one).
    service: Option<ServiceSpec>,
    /// Higress's own Redis; not used (the counters live in the rate-limit service).
    redis: Option<Redis>,
    /// One budget for every request the rule applies to.
    global_threshold: Option<Thresholds>,
    /// Budgets per header, parameter, cookie, consumer or client address; which of those that
    /// apply to a request are checked is `rule_items_match`'s choice.
    rule_items: Option<Vec<RuleItem>>,
    /// `"first"` (default): the first rule item that applies decides, as Higress did before
    /// its PR #4011 (June 2026); `"all"`: every item that applies is checked and any one can
    /// deny, as Higress does since.
    rule_items_match: Option<RuleItemsMatch>,
    /// The status of a denial (429).
    rejected_code: Option<Status>,
    /// The body of a denial (`Too many requests`).
    rejected_msg: Option<String>,
    /// The quota headers, `X-TokenRateLimit-*` included (off).
    show_limit_quota_header: Option<bool>,
}

/// Which rule items a request is checked against.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
enum RuleItemsMatch {
    /// The first item that applies (Higress before June 2026).
    First,
    /// Every item that applies (Higress since PR #4011).
    All,
}

/// The Higress `redis` block: read only to say what to run instead.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct Redis {
    service_name: Option<String>,
    service_port: Option<Port>,
}

/// `token_per_second|minute|hour|day`, one rate each; `key` only in `limit_keys`.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct Thresholds {
    /// In `limit_keys`: the value (exact, `regexp:`, `*`, or an address or CIDR).
    key: Option<KeyText>,
    token_per_second: Option<Tokens>,
    token_per_minute: Option<Tokens>,
    token_per_hour: Option<Tokens>,
    token_per_day: Option<Tokens>,
}

impl Thresholds {
    fn rates(&self, path: &Path) -> Result<Vec<Rate>, ConfigError> {
        let rates: Vec<Rate> = [
            (self.token_per_second, 1),
            (self.token_per_minute, 60),
            (self.token_per_hour, 3_600),
            (self.token_per_day, 86_400),
        ]
        .into_iter()
        .filter_map(|(tokens, window_s)| {
            tokens.map(|t| Rate {
                budget: t.0,
                window_s,
                calendar: None,
            })
        })
        .collect();
        if rates.is_empty() {
            return Err(path.error(
                "needs one of `token_per_second`, `token_per_minute`, `token_per_hour`, `token_per_day`",
            ));
        }
        Ok(rates)
    }
}

/// A `limit_keys` key: text, or a number (YAML turns `key: 102234` into one; Higress reads text).
struct KeyText(String);

impl<'a> Deserialize<'a> for KeyText {
    fn deserialize<D: serde::Deserializer<'a>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<KeyText, E> {
                match s {
                    "" => Err(E::custom("must not be empty")),
                    s => Ok(KeyText(s.to_string())),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<KeyText, E> {
                Ok(KeyText(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for KeyText {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "KeyText".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": ["string", "number"], "minLength": 1})
    }
}

/// One `rule_items` entry: exactly one `limit_by_*` source and its `limit_keys`.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RuleItem {
    limit_by_header: Option<String>,
    limit_by_param: Option<String>,
    limit_by_cookie: Option<String>,
    limit_by_consumer: Option<String>,
    limit_by_per_header: Option<String>,
    limit_by_per_param: Option<String>,
    limit_by_per_cookie: Option<String>,
    limit_by_per_consumer: Option<String>,
    /// `from-remote-addr` or `from-header-<name>`.
    limit_by_per_ip: Option<String>,
    limit_keys: Option<Vec<Thresholds>>,
}

/// What a `limit_by_*` source's `limit_keys` are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// Exact values, each with its own budget.
    Exact,
    /// `regexp:` or `*`: each distinct value counted apart.
    Pattern,
    /// Addresses or CIDRs: each address counted apart.
    Ip,
}

impl RuleItem {
    /// The sources given: (field, key attribute, what the keys are, the source's name).
    fn sources(&self) -> Vec<(&'static str, &'static str, Keys, &str)> {
        [
            (
                "limit_by_header",
                "request.headers.",
                Keys::Exact,
                &self.limit_by_header,
            ),
            (
                "limit_by_param",
                "request.query.",
                Keys::Exact,
                &self.limit_by_param,
            ),
            (
                "limit_by_cookie",
                "request.cookies.",
                Keys::Exact,
                &self.limit_by_cookie,
            ),
            (
                "limit_by_consumer",
                "consumer",
                Keys::Exact,
                &self.limit_by_consumer,
            ),
            (
                "limit_by_per_header",
                "request.headers.",
                Keys::Pattern,
                &self.limit_by_per_header,
            ),
            (
                "limit_by_per_param",
                "request.query.",
                Keys::Pattern,
                &self.limit_by_per_param,
            ),
            (
                "limit_by_per_cookie",
                "request.cookies.",
                Keys::Pattern,
                &self.limit_by_per_cookie,
            ),
            (
                "limit_by_per_consumer",
                "consumer",
                Keys::Pattern,
                &self.limit_by_per_consumer,
            ),
            (
                "limit_by_per_ip",
                "source.ip",
                Keys::Ip,
                &self.limit_by_per_ip,
            ),
        ]
        .into_iter()
        .filter_map(|(field, attribute, keys, source)| {
            source.as_deref().map(|s| (field, attribute, keys, s))
        })
        .collect()
    }

    fn into_limit(
        self,
        rule_name: &str,
        path: &Path,
    ) -> Result<(Limit, Option<ClientIpSource>), ConfigError> {
        let (field, attribute, keys, source) = match self.sources().as_slice() {
            [one] => *one,
            [] => {
                return Err(path.error(
                    "needs one of `limit_by_header`, `limit_by_param`, `limit_by_cookie`, `limit_by_consumer`, `limit_by_per_header`, `limit_by_per_param`, `limit_by_per_cookie`, `limit_by_per_consumer`, `limit_by_per_ip`",
                ))
            }
            several => {
                let names: Vec<String> = several.iter().map(|(f, ..)| format!("`{f}`")).collect();
                return Err(path.error(format!(
                    "names {} at once; give one `limit_by_*` per rule item",
                    names.join(" and ")
                )));
            }
        };
        let source_path = path.field(field);
        let mut ip = None;
        let template = match attribute {
            "consumer" => "{{consumer}}".to_string(),
            "source.ip" => {
                ip = Some(if source == "from-remote-addr" {
                    ClientIpSource::Remote
                } else if let Some(header) = source.strip_prefix("from-header-") {
                    if !HeaderName::valid(header) {
                        return Err(source_path.error(format!(
                            "\"{header}\" after `from-header-` is not a header name"
                        )));
                    }
                    ClientIpSource::Header {
                        name: header.to_ascii_lowercase(),
                        trusted_hops: 1,
                    }
                } else {
                    return Err(source_path.error(
                        "must be `from-remote-addr` or `from-header-<header name>` (e.g. `from-header-x-forwarded-for`)",
                    ));
                });
                "{{source.ip}}".to_string()
            }
            prefix => {
                if source.is_empty() {
                    return Err(source_path
                        .error("names no source; give a header, parameter or cookie name"));
                }
                if source.contains(['{', '}']) {
                    return Err(source_path.error("must not contain `{` or `}`"));
                }
                let name = if prefix == "request.headers." {
                    source.to_ascii_lowercase()
                } else {
                    source.to_string()
                };
                format!("{{{{{prefix}{name}}}}}")
            }
        };
        let key = Template::parse(&template).map_err(|e| source_path.error(e))?;
        let source_name = match attribute {
            "consumer" | "source.ip" => field.to_string(),
            _ => format!("{field}.{source}"),
        };
        let rules = each(
            &path.field("limit_keys"),
            self.limit_keys,
            "is required",
            "is empty: list at least one key",
            |t, at| limit_key(field, keys, t, at),
        )?;
        let limit = Limit {
            name: format!("{rule_name}.{source_name}"),
            key,
            rates: LimitRates::PerValue(rules),
            // First-match (set by the caller): later items are ignored once one applies.
            exclusive: false,
            when: None,
            currency: None,
            deny_status: None,
            engine_window_s: None,
            shadow: false,
            alerts: Vec::new(),
        };
        Ok((limit, ip))
    }
}

fn limit_key(
    field: &str,
    keys: Keys,
    t: Thresholds,
    path: &Path,
) -> Result<ValueRule, ConfigError> {
    let key_path = path.field("key");
    let rates = t.rates(path)?;
    let Some(KeyText(key)) = t.key else {
        return Err(key_path.error("is required"));
    };
    let matcher = match keys {
        Keys::Exact => ValueMatch::Exact(key.clone()),
        Keys::Pattern if key == "*" => ValueMatch::Any,
        Keys::Pattern => match key.strip_prefix("regexp:") {
            Some(re) => ValueMatch::Regex(Pattern::compile(re).map_err(|e| key_path.error(e))?),
            None => {
                return Err(key_path.error(format!(
                    "\"{key}\": `{field}` keys must start with `regexp:` or be exactly `*` (for one exact value use `{}`)",
                    field.replace("_per_", "_")
                )))
            }
        },
        Keys::Ip => match key.parse::<IpNet>() {
            Ok(net) => ValueMatch::Ip(net),
            Err(_) => match key.parse::<std::net::IpAddr>() {
                Ok(ip) => ValueMatch::Ip(IpNet::from(ip)),
                Err(_) => {
                    return Err(key_path.error(format!(
                        "\"{key}\" is not an IP address or CIDR (e.g. 1.1.1.1 or 1.1.1.0/24)"
                    )))
                }
            },
        },
    };
    Ok(ValueRule {
        matcher,
        pattern: key,
        rates,
        shared: false,
    })
}

pub fn parse(value: &Value, warnings: &RefCell<Vec<String>>) -> Result<Vec<Policy>, ConfigError> {
    let root = Path::root();
    let (top, options) = read_with_options::<Rule>(value, &root, &[RULES], warnings)?;
    let mut policies = Vec::new();
    let rules_path = root.field(RULES);
    let rules = match value.get(RULES) {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(rules)) => rules.as_slice(),
        Some(other) => {
            return Err(rules_path.error(format!("expected an array, found {}", de::kind(other))))
        }
    };
    for (i, entry) in rules.iter().enumerate() {
        let path = rules_path.index(i);
        let (scope, scope_fields) = de::read::<ScopeSpec>(entry, &path, &[], de::Unknown::Ignore)?;
        let scope = scope.into_scope(&path)?;
        let (rule, options) = read_with_options::<Rule>(entry, &path, scope_fields, warnings)?;
        let inherited = top.service.as_ref().map(|s| (s, root.field("service")));
        policies.push(Policy {
            scope: Some(scope),
            config: rule.into_config(&path, inherited, options, warnings)?,
        });
    }
    let has_default =
        top.rule_name.is_some() || top.rule_items.is_some() || top.global_threshold.is_some();
    if has_default {
        policies.push(Policy {
            scope: None,
            config: top.into_config(&root, None, options, warnings)?,
        });
    } else if policies.is_empty() {
        return Err(root.error(
            "a Higress configuration needs `rule_name` with `rule_items` or `global_threshold`",
        ));
    }
    // One report queue per VM: every policy must report to the same service.
    if let Some(first) = policies.first() {
        let service = &first.config.service;
        if let Some(i) = policies.iter().position(|p| p.config.service != *service) {
            let path = match policies.get(i).and_then(|p| p.scope.as_ref()) {
                Some(_) => rules_path.index(i).field("service"),
                None => root.field("service"),
            };
            return Err(path.error(
                "differs from the service of the other rules; one plugin reports to one rate-limit service",
            ));
        }
    }
    Ok(policies)
}

impl Rule {
    fn into_config(
        self,
        path: &Path,
        inherited_service: Option<(&ServiceSpec, Path)>,
        options: options::Options,
        warnings: &RefCell<Vec<String>>,
    ) -> Result<Config, ConfigError> {
        let rule_name = self
            .rule_name
            .ok_or_else(|| path.field("rule_name").error("is required"))?;
        let service = match (self.service, inherited_service) {
            (Some(s), _) => s.into_service(&path.field("service"))?,
            (None, Some((s, at))) => s.clone().into_service(&at)?,
            (None, None) => return Err(missing_service(path, self.redis.as_ref())),
        };
        if self.redis.is_some() {
            warnings.borrow_mut().push(format!(
                "`{}`: not used: the counters live in the rate-limit service (cluster `{}`)",
                path.field("redis"),
                service.cluster
            ));
        }

        let mut limits = Vec::new();
        if let Some(g) = &self.global_threshold {
            let at = path.field("global_threshold");
            if g.key.is_some() {
                return Err(at.field("key").error("a global threshold has no key"));
            }
            limits.push(Limit {
                name: format!("{}.global", rule_name.0),
                key: Template::parse("").map_err(|e| at.error(e))?,
                rates: LimitRates::Fixed(g.rates(&at)?),
                exclusive: false,
                when: None,
                currency: None,
                deny_status: None,
                engine_window_s: None,
                shadow: false,
                alerts: Vec::new(),
            });
        }
        let mut ip_source: Option<(Path, ClientIpSource)> = None;
        let mut item_names: Vec<String> = Vec::new();
        let items_path = path.field("rule_items");
        if let Some(items) = self.rule_items {
            if items.is_empty() {
                return Err(items_path.error("is empty: list at least one rule item"));
            }
            if items.len() > MAX_RULE_ITEMS {
                return Err(items_path.error(format!(
                    "has {} items; Higress allows at most {MAX_RULE_ITEMS}",
                    items.len()
                )));
            }
            for (i, item) in items.into_iter().enumerate() {
                let at = items_path.index(i);
                let (mut limit, ip) = item.into_limit(&rule_name, &at)?;
                limit.exclusive = self.rule_items_match != Some(RuleItemsMatch::All);
                if let Some(j) = item_names.iter().position(|n| *n == limit.name) {
                    return Err(at.error(format!(
                        "limits the same source as rule_items[{j}]; merge their limit_keys"
                    )));
                }
                item_names.push(limit.name.clone());
                if let Some(ip) = ip {
                    match &ip_source {
                        Some((_, earlier)) if *earlier != ip => {
                            return Err(at.field("limit_by_per_ip").error(
                                "differs from an earlier limit_by_per_ip; all must read the client address from the same place",
                            ))
                        }
                        _ => ip_source = Some((at.field("limit_by_per_ip"), ip)),
                    }
                }
                limits.push(limit);
            }
        }
        if limits.is_empty() {
            return Err(
                path.error("needs `rule_items` or `global_threshold` (at least one of them)")
            );
        }

        let has_deny = options.has_deny();
        if has_deny && (self.rejected_code.is_some() || self.rejected_msg.is_some()) {
            return Err(path
                .field("deny")
                .error("give either `deny` or `rejected_code` / `rejected_msg`, not both"));
        }
        let has_quota_headers = options.has_quota_headers();
        let mut builder = Builder::new(service, Vec::new(), limits).options(path, options)?;
        let config = builder.config();
        if !has_deny {
            config.deny = DenyConfig {
                status: self.rejected_code.map_or(429, |s| s.0),
                body: Some(
                    self.rejected_msg
                        .unwrap_or_else(|| "Too many requests".into()),
                ),
                headers: Vec::new(),
            };
        }
        let show_quota = self.show_limit_quota_header.unwrap_or(false);
        if !has_quota_headers {
            config.quota_headers = show_quota;
        }
        config.higress_headers = show_quota;
        if let Some((at, ip)) = ip_source {
            config.client_ip = match (ip, &config.client_ip) {
                // `client_ip.trusted_hops` applies to the header Higress names.
                (
                    ClientIpSource::Header { name, .. },
                    ClientIpSource::Header {
                        name: configured,
                        trusted_hops,
                    },
                ) if name == *configured => ClientIpSource::Header {
                    name,
                    trusted_hops: *trusted_hops,
                },
                (ip, ClientIpSource::Remote) => {
                    if let ClientIpSource::Header { name, .. } = &ip {
                        warnings.borrow_mut().push(format!(
                            "`{at}`: takes the right-most `{name}` entry, the address the nearest proxy saw; behind a load balancer that is the balancer's own address. Set \"client_ip\": {{\"header\": \"{name}\", \"trusted_hops\": <proxies in front of Envoy, plus one>}}, or use `from-remote-addr` with Envoy's `xff_num_trusted_hops`"
                        ));
                    }
                    ip
                }
                _ => {
                    return Err(at.error(
                        "reads the client address from another place than `client_ip`; remove one",
                    ))
                }
            };
        }
        Ok(builder.finish())
    }
}

fn missing_service(path: &Path, redis: Option<&Redis>) -> ConfigError {
    let redis_hint = match redis.and_then(|r| r.service_name.as_deref()) {
        Some(name) => {
            let port = redis
                .and_then(|r| r.service_port)
                .map_or(if name.ends_with(".static") { 80 } else { 6379 }, |p| p.0);
            format!(
                " The `redis` block is not used by this plugin: run ratelimit-service with `--store redis --redis-url redis://{name}:{port}` and point `service` at it."
            )
        }
        None => String::new(),
    };
    path.field("service").error(format!(
        "is required: this plugin keeps its counters in the rate-limit service; add \"service\": {{\"cluster\": \"<Envoy cluster of ratelimit-service>\"}} or {{\"host\": \"ratelimit.default.svc.cluster.local\", \"port\": 8080}}.{redis_hint}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Plugin, ConfigError> {
        Plugin::parse(v.to_string().as_bytes())
    }

    fn error(v: Value) -> String {
        match parse(v.clone()) {
            Ok(_) => panic!("accepted: {v}"),
            Err(e) => e.to_string(),
        }
    }

    fn with_service(mut v: Value) -> Value {
        v["service"] = json!({"cluster": "ratelimit"});
        v
    }

    #[test]
    fn a_forwarded_header_without_trusted_hops_is_warned_about() {
        let warned = |extra: Value| {
            let mut c = with_service(
                json!({"rule_name": "r", "rule_items": [{"limit_by_per_ip": "from-header-x-forwarded-for", "limit_keys": [{"key": "0.0.0.0/0", "token_per_minute": 1}]}]}),
            );
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Plugin::parse(c.to_string().as_bytes())
                .unwrap()
                .warnings
                .iter()
                .any(|w| w.contains("trusted_hops") && w.contains("rule_items[0].limit_by_per_ip"))
        };
        assert!(warned(json!({})));
        assert!(!warned(
            json!({"client_ip": {"header": "x-forwarded-for", "trusted_hops": 2}})
        ));
    }

    /// `rule_items_match`: `first` (the default) makes the items exclusive, `all` checks each
    /// item that applies; the global threshold is layered either way.
    #[test]
    fn rule_items_match_first_or_all() {
        let config = |mode: Value| {
            let mut c = with_service(json!({
                "rule_name": "r",
                "global_threshold": {"token_per_minute": 1000},
                "rule_items": [
                    {"limit_by_header": "x-a", "limit_keys": [{"key": "k", "token_per_minute": 10}]},
                    {"limit_by_per_header": "x-b", "limit_keys": [{"key": "*", "token_per_minute": 10}]}
                ]
            }));
            if !mode.is_null() {
                c["rule_items_match"] = mode;
            }
            c
        };
        let exclusive = |mode: Value| -> Vec<bool> {
            parse(config(mode)).unwrap().policies[0]
                .config
                .limits
                .iter()
                .map(|l| l.exclusive)
                .collect()
        };
        assert_eq!(exclusive(Value::Null), [false, true, true]);
        assert_eq!(exclusive(json!("first")), [false, true, true]);
        assert_eq!(exclusive(json!("all")), [false, false, false]);
        let e = error(config(json!("any")));
        assert!(e.contains("rule_items_match"), "{e}");
    }

    #[test]
    fn items_become_limits() {
        let p = parse(with_service(json!({
            "rule_name": "r",
            "global_threshold": {"token_per_minute": 1000, "token_per_day": 50000},
            "rule_items": [
                {"limit_by_header": "X-Ca-Key", "limit_keys": [{"key": 102234, "token_per_minute": 10}]},
                {"limit_by_per_param": "apikey", "limit_keys": [{"key": "regexp:^a", "token_per_second": 10}, {"key": "*", "token_per_hour": 1000}]},
                {"limit_by_per_ip": "from-header-X-Forwarded-For", "limit_keys": [{"key": "10.0.0.0/8", "token_per_day": 5}]},
                {"limit_by_consumer": "", "limit_keys": [{"key": "c1", "token_per_second": 1}]}
            ],
            "redis": {"service_name": "redis.static"},
            "unknown_future_field": 1
        })))
        .unwrap();
        assert_eq!(p.shape, Shape::Higress);
        let c = &p.policies[0].config;
        let names: Vec<&str> = c.limits.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "r.global",
                "r.limit_by_header.X-Ca-Key",
                "r.limit_by_per_param.apikey",
                "r.limit_by_per_ip",
                "r.limit_by_consumer"
            ]
        );
        match &c.limits[0].rates {
            LimitRates::Fixed(r) => assert_eq!(r.len(), 2),
            _ => panic!(),
        }
        match &c.limits[1].rates {
            LimitRates::PerValue(v) => {
                assert!(matches!(&v[0].matcher, ValueMatch::Exact(k) if k == "102234"));
                assert!(!v[0].shared);
            }
            _ => panic!(),
        }
        assert_eq!(
            c.client_ip,
            ClientIpSource::Header {
                name: "x-forwarded-for".into(),
                trusted_hops: 1
            }
        );
        assert_eq!(
            c.deny,
            DenyConfig {
                status: 429,
                body: Some("Too many requests".into()),
                headers: vec![]
            }
        );
        assert!(!c.quota_headers);
        // `redis`, the forwarded header without `trusted_hops`, the unknown field.
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    }

    #[test]
    fn rules_are_scoped_and_inherit_the_service() {
        let p = parse(json!({
            "service": {"cluster": "ratelimit"},
            "_rules_": [
                {"_match_route_": ["chat"], "rule_name": "a", "global_threshold": {"token_per_minute": 5}},
                {"_match_domain_": ["*.example.com"], "rule_name": "b", "global_threshold": {"token_per_minute": 7}}
            ]
        }))
        .unwrap();
        assert_eq!(p.policies.len(), 2);
        assert_eq!(p.policies[0].scope.as_ref().unwrap().routes, ["chat"]);
        assert_eq!(p.policies[1].config.limits[0].name, "b.global");
        // Fields of a rule nobody reads are warned about with their path; the options are read.
        let p = parse(json!({
            "service": {"cluster": "ratelimit"},
            "_rules_": [{"_match_route_": ["chat"], "rule_name": "a", "global_threshold": {"token_per_minute": 5},
                         "reserve": {"tokens": 7}, "future": 1}]
        }))
        .unwrap();
        assert_eq!(p.policies[0].config.reserve, Reserve::Tokens(7));
        assert_eq!(
            p.warnings,
            ["`_rules_[0].future`: not used by llm-token-ratelimit; ignored"]
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"rule_name": "r", "global_threshold": {"token_per_minute": 1}, "redis": {"service_name": "redis.static"}}),
                "`service`: is required: this plugin keeps its counters in the rate-limit service; add \"service\"",
            ),
            (
                json!({"rule_name": "r", "global_threshold": {"token_per_minute": 1}, "redis": {"service_name": "redis.static"}}),
                "--redis-url redis://redis.static:80",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_per_header": "x", "limit_keys": [{"key": "abc", "token_per_minute": 1}]}]})),
                "`rule_items[0].limit_keys[0].key`: \"abc\": `limit_by_per_header` keys must start with `regexp:` or be exactly `*` (for one exact value use `limit_by_header`)",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_per_ip": "from-header-", "limit_keys": [{"key": "1.1.1.1", "token_per_minute": 1}]}]})),
                "`rule_items[0].limit_by_per_ip`",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_per_ip": "from-remote-addr", "limit_keys": [{"key": "nope", "token_per_minute": 1}]}]})),
                "\"nope\" is not an IP address or CIDR",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_header": "x", "limit_keys": [{"key": "a"}]}]})),
                "`rule_items[0].limit_keys[0]`: needs one of `token_per_second`",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_header": "x", "limit_keys": [{"key": "a", "token_per_minute": 0}]}]})),
                "`rule_items[0].limit_keys[0].token_per_minute`: must be at least 1",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_keys": []}]})),
                "`rule_items[0]`: needs one of `limit_by_header`",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_header": "x", "limit_by_param": "y", "limit_keys": []}]})),
                "names `limit_by_header` and `limit_by_param` at once",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [
                    {"limit_by_param": "k", "limit_keys": [{"key": "a", "token_per_minute": 1}]},
                    {"limit_by_param": "k", "limit_keys": [{"key": "b", "token_per_minute": 1}]}]})),
                "`rule_items[1]`: limits the same source as rule_items[0]",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": (0..11).map(|i| json!({"limit_by_header": format!("h{i}"), "limit_keys": [{"key": "a", "token_per_minute": 1}]})).collect::<Vec<_>>()})),
                "has 11 items; Higress allows at most 10",
            ),
            (with_service(json!({"rule_name": "r"})), "needs `rule_items` or `global_threshold`"),
            (
                with_service(json!({"rule_name": "r", "global_threshold": {"token_per_minute": 1}, "rejected_code": 99})),
                "`rejected_code`: 99 is not an HTTP status",
            ),
            (
                with_service(json!({"rule_name": "r", "rule_items": [{"limit_by_header": "x", "limit_keys": [{"key": "a", "token_per_minute": 1, "token_per_mintue": 1}]}]})),
                "`rule_items[0].limit_keys[0].token_per_mintue`: unknown field",
            ),
            (json!({"_rules_": [{"rule_name": "r", "global_threshold": {"token_per_minute": 1}}]}), "`_rules_[0]`: needs `_match_route_`"),
            (
                with_service(json!({"rule_name": "r", "client_ip": {"header": "x-real-ip"},
                    "rule_items": [{"limit_by_per_ip": "from-header-x-forwarded-for", "limit_keys": [{"key": "1.1.1.1", "token_per_minute": 1}]}]})),
                "`rule_items[0].limit_by_per_ip`: reads the client address from another place than `client_ip`",
            ),
        ];
        for (config, want) in cases {
            let got = error(config.clone());
            assert!(
                got.contains(want),
                "for {config}\n  got:  {got}\n  want: {want}"
            );
        }
    }
}
