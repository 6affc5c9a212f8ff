//! The Higress shape (`ai-token-ratelimit`, DESIGN section 2.3), read as Higress reads it and
//! translated into limits:
//!
//! * each `rule_items` entry is a limit keyed by its `limit_by_*` source, with one value rule
//!   per `limit_keys` entry (exact values for `limit_by_*`; `regexp:` or `*` for
//!   `limit_by_per_*`, each distinct value counted apart; addresses or CIDRs for
//!   `limit_by_per_ip`); `global_threshold` is one global limit;
//! * every matching item and the global threshold are checked together, and any one that is
//!   exhausted denies (Higress 2.x semantics);
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

use ipnet::IpNet;
use serde_json::Value;

use super::fields::{kind, Object, Path};
use super::native::{self, options, regex, status, valid_header_name, MAX_TOKENS};
use super::*;
use crate::limits::{LimitRates, Rate, ValueMatch, ValueRule};
use crate::template::Template;

/// Higress accepts at most this many `rule_items`.
const MAX_RULE_ITEMS: usize = 10;

const WINDOWS: [(&str, u64); 4] = [
    ("token_per_second", 1),
    ("token_per_minute", 60),
    ("token_per_hour", 3_600),
    ("token_per_day", 86_400),
];

pub fn parse(value: &Value) -> Result<(Vec<Policy>, Vec<String>), ConfigError> {
    let root = Path::root();
    let top_service = value.get("service");
    let mut policies = Vec::new();
    let mut warnings = Vec::new();
    if let Some(rules) = value.get("_rules_") {
        let path = root.field("_rules_");
        let Value::Array(rules) = rules else {
            return Err(path.error(format!("expected an array, found {}", kind(rules))));
        };
        for (i, rule) in rules.iter().enumerate() {
            let mut o = Object::new(path.index(i), rule)?;
            let scope = scope(&mut o)?;
            let config = one(o, top_service, &mut warnings)?;
            policies.push(Policy {
                scope: Some(scope),
                config,
            });
        }
    }
    let mut top = Object::new(root.clone(), value)?;
    top.allow("_rules_");
    let has_default = ["rule_name", "rule_items", "global_threshold"]
        .iter()
        .any(|k| top.has(k));
    if has_default {
        policies.push(Policy {
            scope: None,
            config: one(top, None, &mut warnings)?,
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
                Some(_) => root.field("_rules_").index(i).field("service"),
                None => root.field("service"),
            };
            return Err(path.error(
                "differs from the service of the other rules; one plugin reports to one rate-limit service",
            ));
        }
    }
    Ok((policies, warnings))
}

fn strings(o: &mut Object<'_>, name: &'static str) -> Result<Vec<String>, ConfigError> {
    let path = o.path.field(name);
    match o.array(name)? {
        None => Ok(Vec::new()),
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => Err(path.index(i).error(format!(
                    "expected a non-empty string, found {}",
                    kind(other)
                ))),
            })
            .collect(),
    }
}

fn scope(o: &mut Object<'_>) -> Result<Scope, ConfigError> {
    let scope = Scope {
        routes: strings(o, "_match_route_")?,
        domains: strings(o, "_match_domain_")?
            .into_iter()
            .map(|d| d.to_ascii_lowercase())
            .collect(),
        services: strings(o, "_match_service_")?,
    };
    if scope == Scope::default() {
        return Err(o.path.error(
            "needs `_match_route_`, `_match_domain_` or `_match_service_` (a list of names)",
        ));
    }
    Ok(scope)
}

/// One Higress rule configuration (the top level, or one `_rules_` entry).
fn one(
    mut o: Object<'_>,
    inherited_service: Option<&Value>,
    warnings: &mut Vec<String>,
) -> Result<Config, ConfigError> {
    let rule_name = o.required_string("rule_name")?;
    if rule_name.is_empty() {
        return Err(o.path.field("rule_name").error("must not be empty"));
    }
    let service = match (o.value("service"), inherited_service) {
        (Some(v), _) | (None, Some(v)) => {
            native::service(Object::new(o.path.field("service"), v)?)?
        }
        (None, None) => return Err(missing_service(&mut o)),
    };
    if let Some(redis) = o.value("redis") {
        if !redis.is_object() {
            return Err(o
                .path
                .field("redis")
                .error(format!("expected an object, found {}", kind(redis))));
        }
        warnings.push(format!(
            "`{}`: not used: the counters live in the rate-limit service (cluster `{}`)",
            o.path.field("redis"),
            service.cluster
        ));
    }

    let mut limits = Vec::new();
    if let Some(mut g) = o.object("global_threshold")? {
        let rates = rates(&mut g)?;
        g.finish()?;
        limits.push(Limit {
            name: format!("{rule_name}.global"),
            key: Template::parse("").map_err(|e| o.path.error(e))?,
            rates: LimitRates::Fixed(rates),
            exclusive: false,
            when: None,
        });
    }
    let mut ip_source: Option<(Path, ClientIpSource)> = None;
    let mut item_names: Vec<String> = Vec::new();
    let items_path = o.path.field("rule_items");
    if let Some(items) = o.array("rule_items")? {
        if items.is_empty() {
            return Err(items_path.error("is empty: list at least one rule item"));
        }
        if items.len() > MAX_RULE_ITEMS {
            return Err(items_path.error(format!(
                "has {} items; Higress allows at most {MAX_RULE_ITEMS}",
                items.len()
            )));
        }
        for (i, item) in items.iter().enumerate() {
            let path = items_path.index(i);
            let (limit, ip) = rule_item(rule_name, Object::new(path.clone(), item)?)?;
            if let Some(j) = item_names.iter().position(|n| *n == limit.name) {
                return Err(path.error(format!(
                    "limits the same source as rule_items[{j}]; merge their limit_keys"
                )));
            }
            item_names.push(limit.name.clone());
            if let Some(ip) = ip {
                match &ip_source {
                    Some((_, earlier)) if *earlier != ip => {
                        return Err(path.field("limit_by_per_ip").error(
                            "differs from an earlier limit_by_per_ip; all must read the client address from the same place",
                        ))
                    }
                    _ => ip_source = Some((path.field("limit_by_per_ip"), ip)),
                }
            }
            limits.push(limit);
        }
    }
    if limits.is_empty() {
        return Err(o
            .path
            .error("needs `rule_items` or `global_threshold` (at least one of them)"));
    }

    let rejected_code = status(&mut o, "rejected_code")?;
    let rejected_msg = o.string("rejected_msg")?;
    let show_quota = o.bool("show_limit_quota_header")?;
    let has_deny = o.has("deny");
    let has_quota_headers = o.has("quota_headers");
    let mut options = options(&mut o)?;
    if has_deny && (rejected_code.is_some() || rejected_msg.is_some()) {
        return Err(o
            .path
            .field("deny")
            .error("give either `deny` or `rejected_code` / `rejected_msg`, not both"));
    }
    if !has_deny {
        options.deny = DenyConfig {
            status: rejected_code.unwrap_or(429),
            body: Some(rejected_msg.unwrap_or("Too many requests").to_string()),
            headers: Vec::new(),
        };
    }
    if !has_quota_headers {
        options.quota_headers = show_quota.unwrap_or(false);
    }
    options.higress_headers = show_quota.unwrap_or(false);
    if let Some((path, ip)) = ip_source {
        options.client_ip = match (ip, &options.client_ip) {
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
                    warnings.push(format!(
                        "`{path}`: takes the right-most `{name}` entry, the address the nearest proxy saw; behind a load balancer that is the balancer's own address. Set \"client_ip\": {{\"header\": \"{name}\", \"trusted_hops\": <proxies in front of Envoy, plus one>}}, or use `from-remote-addr` with Envoy's `xff_num_trusted_hops`"
                    ));
                }
                ip
            }
            _ => {
                return Err(path.error(
                    "reads the client address from another place than `client_ip`; remove one",
                ))
            }
        };
    }
    for field in o.leftovers() {
        warnings.push(format!(
            "`{field}`: not used by llm-token-ratelimit; ignored"
        ));
    }
    Ok(options.into_config(service, Vec::new(), limits))
}

fn missing_service(o: &mut Object<'_>) -> ConfigError {
    let redis = o.value("redis").and_then(Value::as_object);
    let redis_hint = match redis
        .and_then(|r| r.get("service_name"))
        .and_then(Value::as_str)
    {
        Some(name) => {
            let port = redis
                .and_then(|r| r.get("service_port"))
                .and_then(Value::as_u64)
                .unwrap_or(if name.ends_with(".static") { 80 } else { 6379 });
            format!(
                " The `redis` block is not used by this plugin: run ratelimit-service with `--store redis --redis-url redis://{name}:{port}` and point `service` at it."
            )
        }
        None => String::new(),
    };
    o.path.field("service").error(format!(
        "is required: this plugin keeps its counters in the rate-limit service; add \"service\": {{\"cluster\": \"<Envoy cluster of ratelimit-service>\"}} or {{\"host\": \"ratelimit.default.svc.cluster.local\", \"port\": 8080}}.{redis_hint}"
    ))
}

/// `token_per_*` fields of `o` as rates.
fn rates(o: &mut Object<'_>) -> Result<Vec<Rate>, ConfigError> {
    let mut rates = Vec::new();
    for (name, window_s) in WINDOWS {
        match o.u64_max(name, MAX_TOKENS)? {
            None => {}
            Some(0) => return Err(o.path.field(name).error("must be a positive integer")),
            Some(tokens) => rates.push(Rate { tokens, window_s }),
        }
    }
    if rates.is_empty() {
        return Err(o.path.error(
            "needs one of `token_per_second`, `token_per_minute`, `token_per_hour`, `token_per_day`",
        ));
    }
    Ok(rates)
}

/// The `limit_by_*` kinds: (field, key attribute, what its `limit_keys` are).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// Exact values, each with its own budget.
    Exact,
    /// `regexp:` or `*`: each distinct value counted apart.
    Pattern,
    /// Addresses or CIDRs: each address counted apart.
    Ip,
}

const KINDS: [(&str, &str, Keys); 9] = [
    ("limit_by_header", "request.headers.", Keys::Exact),
    ("limit_by_param", "request.query.", Keys::Exact),
    ("limit_by_cookie", "request.cookies.", Keys::Exact),
    ("limit_by_consumer", "consumer", Keys::Exact),
    ("limit_by_per_header", "request.headers.", Keys::Pattern),
    ("limit_by_per_param", "request.query.", Keys::Pattern),
    ("limit_by_per_cookie", "request.cookies.", Keys::Pattern),
    ("limit_by_per_consumer", "consumer", Keys::Pattern),
    ("limit_by_per_ip", "source.ip", Keys::Ip),
];

fn rule_item(
    rule_name: &str,
    mut o: Object<'_>,
) -> Result<(Limit, Option<ClientIpSource>), ConfigError> {
    let present: Vec<(&str, &str, Keys)> = KINDS
        .iter()
        .copied()
        .filter(|(field, ..)| o.has(field))
        .collect();
    let (field, attribute, keys) = match present.as_slice() {
        [one] => *one,
        [] => {
            return Err(o.path.error(format!(
                "needs one of {}",
                KINDS.map(|(f, ..)| format!("`{f}`")).join(", ")
            )))
        }
        several => {
            return Err(o.path.error(format!(
                "names {} at once; give one `limit_by_*` per rule item",
                several
                    .iter()
                    .map(|(f, ..)| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )))
        }
    };
    let source_path = o.path.field(field);
    let source = match o.value(field) {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(source_path.error(format!("expected a string, found {}", kind(other))))
        }
        None => "",
    };
    let mut ip = None;
    let template = match attribute {
        "consumer" => "{{consumer}}".to_string(),
        "source.ip" => {
            ip = Some(if source == "from-remote-addr" {
                ClientIpSource::Remote
            } else if let Some(header) = source.strip_prefix("from-header-") {
                if !valid_header_name(header) {
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
                return Err(
                    source_path.error("names no source; give a header, parameter or cookie name")
                );
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

    let keys_path = o.path.field("limit_keys");
    let rules = match o.array("limit_keys")? {
        None => return Err(keys_path.error("is required")),
        Some(items) if items.is_empty() => {
            return Err(keys_path.error("is empty: list at least one key"))
        }
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| limit_key(field, keys, Object::new(keys_path.index(i), v)?))
            .collect::<Result<Vec<_>, _>>()?,
    };
    o.finish()?;
    let source_name = match attribute {
        "consumer" | "source.ip" => field.to_string(),
        _ => format!("{field}.{source}"),
    };
    Ok((
        Limit {
            name: format!("{rule_name}.{source_name}"),
            key,
            rates: LimitRates::PerValue(rules),
            // Higress: the first matching rule item applies, later ones are ignored.
            exclusive: true,
            when: None,
        },
        ip,
    ))
}

fn limit_key(field: &str, keys: Keys, mut o: Object<'_>) -> Result<ValueRule, ConfigError> {
    let key_path = o.path.field("key");
    // YAML turns `key: 102234` into a number; Higress reads it as text.
    let key = match o.value("key") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(_)) | None => return Err(key_path.error("is required")),
        Some(other) => {
            return Err(key_path.error(format!("expected a string, found {}", kind(other))))
        }
    };
    let matcher = match keys {
        Keys::Exact => ValueMatch::Exact(key.clone()),
        Keys::Pattern if key == "*" => ValueMatch::Any,
        Keys::Pattern => match key.strip_prefix("regexp:") {
            Some(re) => ValueMatch::Regex(regex(&key_path, re)?),
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
    let rates = rates(&mut o)?;
    o.finish()?;
    Ok(ValueRule {
        matcher,
        pattern: key,
        rates,
        shared: false,
    })
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
                "`rule_items[0].limit_keys[0].token_per_minute`: must be a positive integer",
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
