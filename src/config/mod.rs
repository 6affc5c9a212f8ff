//! The validated configuration model ([`model`]), and the entry point that reads any accepted
//! shape into it ([`Plugin::parse`], in `load`).
//!
//! Every shape (native, ASM, Higress) ends up as [`Config`]s, so the request path never needs to
//! know which dialect the operator wrote. A [`Plugin`] holds one, or with Higress `_rules_` one
//! per scope (route, domain, upstream service).

mod builder;
mod de;
mod foreign;
mod load;
mod model;
mod options;
#[cfg(feature = "schema")]
pub mod schema;
mod scope;
mod shape;
mod values;

/// Reads the service's JSON answers too: one reader for every typed JSON the plugin takes in.
pub use de::read_json;
pub use model::*;
pub use scope::{Scope, ScopeFacts};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_ip::{ClientIpSource, Prefixes};
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
        // The documented "a model and its dated snapshots" condition (docs/src/configuration.md).
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
            (
                r#"{"service": {"cluster": "a"}, "reserve": {"trim": true}, "limits": [{"name": "g", "key": ""}]}"#,
                "`reserve.trim`: needs \"tokens\": \"max_tokens\"",
            ),
            (
                r#"{"service": {"cluster": "a", "protocol": "asm"}, "reserve": {"tokens": "max_tokens", "trim": true}, "limits": [{"name": "g", "key": ""}]}"#,
                "`reserve.trim`: needs the v1 protocol",
            ),
            (
                r#"{"service": {"cluster": "a"}, "reserve": {"tokens": "max_tokens", "min": 5}, "limits": [{"name": "g", "key": ""}]}"#,
                "`reserve.min`: is used only with",
            ),
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
                r#"{"service": {"cluster": "a", "admission": "lease", "protocol": "asm"}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.admission`: \"lease\" needs protocol \"v1\"",
            ),
            (
                r#"{"service": {"cluster": "a", "admission": "lease"}, "limits": [{"name": "g", "key": ""}]}"#,
                "`service.admission`: \"lease\" needs a reservation",
            ),
            (
                r#"{"service": {"cluster": "a", "admission": "leases"}, "limits": []}"#,
                "`service.admission`",
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
        assert_eq!(rates(0)[0].budget, 500_000_000);
        assert_eq!(rates(0)[0].calendar, month_in("Asia/Shanghai"));
        assert_eq!(rates(0)[0].window_s, Period::Month.longest_s());
        let dev = rates(1);
        assert_eq!(
            (dev[0].budget, dev[0].calendar.clone()),
            (20_000_000, month_in("UTC"))
        );
        assert_eq!(
            (dev[1].budget, dev[1].window_s, dev[1].calendar.clone()),
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
