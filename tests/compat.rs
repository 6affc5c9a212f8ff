//! Drop-in for ASM and Higress users: every configuration example of Higress's
//! `ai-token-ratelimit` documentation and the ASM example (`examples/configs/`), verbatim,
//! loaded by the plugin in a real Envoy and exercised against the real service and the mock LLM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Response};
use testkit::service::{mock_llm, Service};

fn example(path: &str) -> Value {
    let file = testkit::repo().join("examples/configs").join(path);
    serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap()
}

/// A Higress example as the repository keeps it: Higress's config plus the one thing this
/// plugin needs that Higress does not, where the rate-limit service is (`service`).
fn higress(path: &str) -> Value {
    let config = example(path);
    assert_eq!(config["service"], json!({"cluster": "ratelimit"}));
    config
}

struct Stack {
    svc: Service,
    _llm: Service,
    envoy: Envoy,
}

fn stack(config: &Value) -> Stack {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let envoy = Envoy::start(
        config,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    Stack {
        svc,
        _llm: llm,
        envoy,
    }
}

impl Stack {
    /// A chat completion that uses `tokens` (half prompt, half completion).
    fn ask(&self, path: &str, headers: &[(&str, &str)], tokens: u64) -> Response {
        let (prompt, completion) = ((tokens / 2).to_string(), (tokens - tokens / 2).to_string());
        let mut h = vec![
            ("x-mock-prompt-tokens", prompt.as_str()),
            ("x-mock-completion-tokens", completion.as_str()),
        ];
        h.extend_from_slice(headers);
        http::post_json(self.envoy.port, path, &h, &json!({"model": "qwen-plus"}))
    }

    /// Waits until `n` reports have been accepted, so the next check sees the usage.
    fn settled(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.envoy.metric("reports.sent") < n {
            assert!(Instant::now() < deadline, "{n} reports never arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

const CHAT: &str = "/v1/chat/completions";

#[test]
fn verbatim_higress_configs_are_refused_with_what_to_add() {
    // Exactly as Higress's documentation has it.
    let mut config = example("higress/apikey-param.json");
    config.as_object_mut().unwrap().remove("service");
    let log = Envoy::try_start(
        &config.to_string(),
        &[cluster("ratelimit", 1), cluster("upstream", 1)],
        "127.0.0.1",
    )
    .err()
    .expect("a Higress config without `service` cannot work");
    assert!(
        log.contains(
            "`service`: is required: this plugin keeps its counters in the rate-limit service"
        ),
        "{log}"
    );
    assert!(
        log.contains("--store redis --redis-url redis://redis.static:80"),
        "{log}"
    );
}

#[test]
fn higress_global_threshold() {
    let s = stack(&higress("higress/global-threshold.json"));
    let first = s.ask(CHAT, &[], 600);
    assert_eq!(first.status, 200);
    // `show_limit_quota_header: true`: the headers Higress users read, and the OpenAI ones.
    assert_eq!(first.header("x-tokenratelimit-limit"), Some("1000"));
    assert_eq!(first.header("x-tokenratelimit-remaining"), Some("1000"));
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("1000"));
    s.settled(1);
    let second = s.ask(CHAT, &[], 600);
    assert_eq!(second.status, 200, "400 left");
    assert_eq!(second.header("x-tokenratelimit-remaining"), Some("400"));
    assert_eq!(
        second.header("x-tokenratelimit-reset"),
        None,
        "only on a denial"
    );
    s.settled(2);
    let denied = s.ask(CHAT, &[], 600);
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "Too many requests");
    assert_eq!(denied.header("x-tokenratelimit-remaining"), Some("0"));
    let reset: u64 = denied
        .header("x-tokenratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=120).contains(&reset),
        "seconds until the minute's budget is back: {reset}"
    );
}

#[test]
fn higress_apikey_param() {
    let s = stack(&higress("higress/apikey-param.json"));
    let exact = "/v1/chat/completions?apikey=9a342114-ba8a-11ec-b1bf-00163e1250b5";
    assert_eq!(s.ask(exact, &[], 10).status, 200);
    s.settled(1);
    let denied = s.ask(exact, &[], 10);
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "Too many requests");
    // Other keys have budgets of their own; no key, no limit.
    assert_eq!(
        s.ask(
            "/v1/chat/completions?apikey=a6a6d7f2-ba8a-11ec-bec2-00163e1250b5",
            &[],
            5
        )
        .status,
        200
    );
    assert_eq!(
        s.ask("/v1/chat/completions?apikey=zzz", &[], 900).status,
        200
    );
    s.settled(3);
    // `*`: 1000 per hour for each key.
    assert_eq!(
        s.ask("/v1/chat/completions?apikey=zzz", &[], 200).status,
        200
    );
    s.settled(4);
    assert_eq!(s.ask("/v1/chat/completions?apikey=zzz", &[], 1).status, 429);
    assert_eq!(s.ask("/v1/chat/completions?apikey=yyy", &[], 1).status, 200);
    assert_eq!(s.ask(CHAT, &[], 5000).status, 200);
    assert_eq!(s.envoy.metric("requests_unlimited"), 1);
    // The first rule item that applies decides; later ones are ignored (Higress's words): the
    // exact keys of the first item never reach the `limit_by_per_param` item's counters.
    let per_param = "default_rule.limit_by_per_param.apikey";
    assert_eq!(
        s.svc
            .remaining(per_param, "9a342114-ba8a-11ec-b1bf-00163e1250b5"),
        None
    );
    assert_eq!(
        s.svc
            .remaining(per_param, "a6a6d7f2-ba8a-11ec-bec2-00163e1250b5"),
        None
    );
    assert_eq!(
        s.svc.remaining(
            "default_rule.limit_by_param.apikey",
            "a6a6d7f2-ba8a-11ec-bec2-00163e1250b5"
        ),
        Some(95)
    );
    // A key no exact rule names: the second item, its first matching key only (10 per second).
    assert_eq!(s.ask("/v1/chat/completions?apikey=abc", &[], 4).status, 200);
    let q = http::send(
        s.svc.port,
        "GET",
        &format!("/v1/quota?limit={per_param}&value=abc"),
        &[],
        b"",
    )
    .json();
    assert_eq!(q["meters"].as_array().unwrap().len(), 1, "{q}");
    assert_eq!(
        (
            q["meters"][0]["tokens"].clone(),
            q["meters"][0]["window_s"].clone()
        ),
        (json!(10), json!(1))
    );
}

/// Higress since its PR #4011 (June 2026): with `"rule_items_match": "all"` every rule item
/// that applies is checked and charged, any one of them denies, and `global_threshold` is
/// layered on top of them.
#[test]
fn higress_all_match_layers_every_item_and_the_global_threshold() {
    let mut config = higress("higress/apikey-param.json");
    config["rule_items_match"] = json!("all");
    config["global_threshold"] = json!({"token_per_minute": 1000});
    let s = stack(&config);
    let exact_key = "9a342114-ba8a-11ec-b1bf-00163e1250b5";
    let exact = format!("/v1/chat/completions?apikey={exact_key}");
    assert_eq!(s.ask(&exact, &[], 10).status, 200);
    s.settled(1);
    // Charged on both items (its exact rule, and the `*` rule of the per-value item) and on
    // the global threshold.
    assert_eq!(
        s.svc
            .remaining("default_rule.limit_by_param.apikey", exact_key),
        Some(0)
    );
    assert_eq!(
        s.svc
            .remaining("default_rule.limit_by_per_param.apikey", exact_key),
        Some(990)
    );
    assert_eq!(s.svc.remaining("default_rule.global", ""), Some(990));
    // The exact rule is spent: it denies, though the per-value item has budget left.
    let denied = s.ask(&exact, &[], 1);
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "Too many requests");
    // Another key: only the per-value item applies.
    assert_eq!(s.ask("/v1/chat/completions?apikey=zzz", &[], 5).status, 200);
    s.settled(2);
    assert_eq!(s.svc.remaining("default_rule.global", ""), Some(985));
    assert_eq!(
        s.svc
            .remaining("default_rule.limit_by_per_param.apikey", "zzz"),
        Some(995)
    );
}

#[test]
fn higress_header_with_numeric_keys() {
    let s = stack(&higress("higress/x-ca-key-header.json"));
    assert_eq!(s.ask(CHAT, &[("x-ca-key", "102234")], 10).status, 200);
    s.settled(1);
    assert_eq!(s.ask(CHAT, &[("x-ca-key", "102234")], 10).status, 429);
    assert_eq!(s.ask(CHAT, &[("x-ca-key", "308239")], 10).status, 200);
}

/// The documentation's walk-through (`WasmPlugin` `default_limit_by_param_apikey`): the apikey
/// `123456` (a YAML number there) gets 200 tokens a minute; the first answer used 46.
#[test]
fn higress_default_limit_by_param_apikey() {
    let s = stack(&higress("higress/default-limit-by-param-apikey.json"));
    let limited = "/v1/chat/completions?apikey=123456";
    assert_eq!(s.ask(limited, &[], 46).status, 200);
    s.settled(1);
    assert_eq!(s.ask(limited, &[], 154).status, 200, "154 left");
    s.settled(2);
    let denied = s.ask(limited, &[], 1);
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "Too many requests");
    // Another key, or none, is not limited by this rule.
    assert_eq!(
        s.ask("/v1/chat/completions?apikey=654321", &[], 500).status,
        200
    );
    assert_eq!(s.ask(CHAT, &[], 500).status, 200);
    assert_eq!(s.envoy.metric("requests_matched"), 5);
}

#[test]
fn higress_forwarded_ip() {
    let mut config = higress("higress/forwarded-ip.json");
    // Envoy appends the peer to X-Forwarded-For: the client's entry is the second from the right.
    config["client_ip"] = json!({"header": "x-forwarded-for", "trusted_hops": 2});
    let s = stack(&config);
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "1.1.1.1")], 10).status,
        200
    );
    s.settled(1);
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "1.1.1.1")], 1).status,
        429
    );
    // A spoofed left-most entry changes nothing: the address is read from the right.
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "9.9.9.9, 1.1.1.1")], 1)
            .status,
        429
    );
    // The /24 and the fallback: each address its own budget.
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "1.1.1.7")], 100).status,
        200
    );
    s.settled(2);
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "1.1.1.7")], 1).status,
        429
    );
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "1.1.1.8")], 1).status,
        200
    );
    assert_eq!(
        s.ask(CHAT, &[("x-forwarded-for", "8.8.8.8")], 999).status,
        200
    );
}

#[test]
fn higress_consumer() {
    let s = stack(&higress("higress/consumer.json"));
    let consumer2 = [("x-mse-consumer", "consumer2")];
    assert_eq!(s.ask(CHAT, &consumer2, 100).status, 200);
    s.settled(1);
    assert_eq!(s.ask(CHAT, &consumer2, 1).status, 429);
    assert_eq!(
        s.ask(CHAT, &[("x-mse-consumer", "consumer1")], 5).status,
        200
    );
    // `limit_by_per_consumer` `regexp:^b.*`: 100 per minute for each such consumer.
    assert_eq!(s.ask(CHAT, &[("x-mse-consumer", "bob")], 100).status, 200);
    s.settled(3);
    assert_eq!(s.ask(CHAT, &[("x-mse-consumer", "bob")], 1).status, 429);
    assert_eq!(s.ask(CHAT, &[("x-mse-consumer", "bea")], 1).status, 200);
}

#[test]
fn higress_cookie_with_custom_rejection() {
    let s = stack(&higress("higress/cookie.json"));
    let cookie = [("cookie", "session=x; key1=value1")];
    assert_eq!(s.ask(CHAT, &cookie, 10).status, 200);
    s.settled(1);
    let denied = s.ask(CHAT, &cookie, 1);
    assert_eq!(denied.status, 200);
    assert_eq!(denied.text(), r#"{"code":-1,"msg":"Too many requests"}"#);
    let other = s.ask(CHAT, &[("cookie", "key1=value2")], 1);
    assert_eq!(other.status, 200);
    assert_ne!(other.text(), r#"{"code":-1,"msg":"Too many requests"}"#);
    // `limit_by_per_cookie` `*`: every other value its own 1,000 per hour.
    s.settled(2);
    assert_eq!(s.ask(CHAT, &[("cookie", "key1=zzz")], 999).status, 200);
    s.settled(3);
    assert_eq!(
        s.ask(CHAT, &[("cookie", "key1=zzz")], 1).status,
        200,
        "1 left"
    );
    s.settled(4);
    let spent = s.ask(CHAT, &[("cookie", "key1=zzz")], 1);
    assert_eq!(spent.text(), r#"{"code":-1,"msg":"Too many requests"}"#);
    assert_eq!(s.ask(CHAT, &[("cookie", "key1=yyy")], 1).status, 200);
    assert_eq!(
        s.svc
            .remaining("default_rule.limit_by_per_cookie.key1", "zzz"),
        Some(0)
    );
}

#[test]
fn higress_per_header_and_per_ip_from_the_peer() {
    let config = json!({
        "rule_name": "r",
        "rule_items": [
            {"limit_by_per_header": "x-team", "limit_keys": [
                {"key": "regexp:^vip-", "token_per_hour": 1000}, {"key": "*", "token_per_hour": 50}]},
            {"limit_by_per_ip": "from-remote-addr", "limit_keys": [{"key": "0.0.0.0/0", "token_per_hour": 30}]}],
        "service": {"cluster": "ratelimit"}
    });
    let s = stack(&config);
    assert!(
        !s.envoy.log().contains("trusted_hops"),
        "the peer needs no trusted hops"
    );
    // Each team value its own budget; a vip- team a larger one.
    assert_eq!(s.ask(CHAT, &[("x-team", "basic")], 50).status, 200);
    s.settled(1);
    assert_eq!(s.ask(CHAT, &[("x-team", "basic")], 1).status, 429);
    assert_eq!(s.ask(CHAT, &[("x-team", "vip-a")], 500).status, 200);
    s.settled(2);
    assert_eq!(s.ask(CHAT, &[("x-team", "vip-a")], 1).status, 200);
    assert_eq!(
        s.svc
            .remaining("r.limit_by_per_header.x-team", "vip-a")
            .map(|r| r <= 500),
        Some(true)
    );
    // No team: the next item, the peer's address (each address its own 30).
    s.settled(3);
    assert_eq!(s.ask(CHAT, &[], 30).status, 200);
    s.settled(4);
    assert_eq!(s.ask(CHAT, &[], 1).status, 429);
    assert_eq!(s.svc.remaining("r.limit_by_per_ip", "127.0.0.1"), Some(0));
}

#[test]
fn higress_match_rules_scope_policies() {
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "_rules_": [
            {"_match_domain_": ["*.limited.test"], "rule_name": "by-domain", "global_threshold": {"token_per_hour": 10}},
            {"_match_route_": ["llm-route"], "_match_domain_": ["route.test"], "rule_name": "by-route", "global_threshold": {"token_per_hour": 20}},
            {"_match_service_": ["upstream"], "_match_domain_": ["service.test"], "rule_name": "by-service", "global_threshold": {"token_per_hour": 30}}
        ]
    });
    let s = stack(&config);
    let mut sent = 0;
    for (host, budget) in [
        ("a.limited.test", 10),
        ("route.test", 20),
        ("service.test", 30),
    ] {
        assert_eq!(s.ask(CHAT, &[("host", host)], budget).status, 200, "{host}");
        sent += 1;
        s.settled(sent);
        let denied = s.ask(CHAT, &[("host", host)], 1);
        assert_eq!(denied.status, 429, "{host}");
        assert_eq!(denied.text(), "Too many requests");
    }
    // No rule claims it and there is no default: not limited at all.
    assert_eq!(s.ask(CHAT, &[("host", "free.test")], 1000).status, 200);
    assert_eq!(s.envoy.metric("requests_matched"), 6);
}

#[test]
fn asm_wasmplugin_example() {
    let config = example("asm/plugin-config.json");
    let svc = Service::start(&[], &[("RATE_LIMIT_CONFIG", testkit::ASM_EXAMPLE_RULES)]);
    let llm = mock_llm();
    // The cluster Istio creates for `rateLimitService`.
    let envoy = Envoy::start(
        &config,
        &[
            cluster(
                "outbound|80||asm-llm-token-rate-limit-example.default.svc.cluster.local",
                svc.port,
            ),
            cluster("upstream", llm.port),
        ],
    );
    let s = Stack {
        svc,
        _llm: llm,
        envoy,
    };
    let dashscope =
        |user_type: &'static str| [("host", "dashscope.aliyuncs.com"), ("user-type", user_type)];
    // regular-user: a bucket of 200 (50 more every 30 s), as ASM's documentation has it.
    assert_eq!(s.ask(CHAT, &dashscope("regular-user"), 120).status, 200);
    s.settled(1);
    assert_eq!(
        s.ask(CHAT, &dashscope("regular-user"), 120).status,
        200,
        "80 left"
    );
    s.settled(2);
    let denied = s.ask(CHAT, &dashscope("regular-user"), 1);
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "regular-user is being rate-limited");
    // subscriber: a bucket of 1000 (100 more every minute).
    assert_eq!(s.ask(CHAT, &dashscope("subscriber"), 600).status, 200);
    s.settled(3);
    assert_eq!(
        s.ask(CHAT, &dashscope("subscriber"), 600).status,
        200,
        "400 left"
    );
    s.settled(4);
    assert_eq!(s.ask(CHAT, &dashscope("subscriber"), 1).status, 429);
    // Another host is not matched.
    assert_eq!(
        s.ask(
            CHAT,
            &[("host", "api.openai.com"), ("user-type", "regular-user")],
            1
        )
        .status,
        200
    );
    assert_eq!(s.envoy.metric("requests_matched"), 6);
    let _ = &s.svc;
}
