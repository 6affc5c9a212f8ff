//! The plugin in a real Envoy against the real rate-limit service (memory store): budgets are
//! enforced by the service's own counters, in protocol v1 and in protocol asm.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Server};
use testkit::service::Service;

fn upstream() -> Server {
    http::uses_max_tokens()
}

#[test]
fn reservations_exhaust_a_per_user_budget() {
    let (svc, up) = (Service::start(&[], &[]), upstream());
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "per-user", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1h"}],
        "reserve": {"tokens": "max_tokens"}
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |user: &str, max_tokens: u64| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", user)],
            &json!({"model": "m", "max_tokens": max_tokens}),
        )
    };
    let first = ask("alice", 60);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("40"));
    let second = ask("alice", 60);
    assert_eq!(second.status, 429, "{}", second.text());
    assert_eq!(second.header("x-ratelimit-remaining-tokens"), Some("40"));
    assert_eq!(second.json()["error"]["code"], "rate_limit_exceeded");
    assert!(
        second
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        ask("alice", 40).status,
        200,
        "what is left can still be spent"
    );
    assert_eq!(
        ask("bob", 60).status,
        200,
        "another user has a budget of its own"
    );
    assert_eq!(up.requests().len(), 3);
    let q = http::send(
        svc.port,
        "GET",
        "/v1/quota?limit=per-user&value=alice",
        &[],
        b"",
    )
    .json();
    assert_eq!(q["meters"][0]["remaining"], 0);
}

#[test]
fn asm_protocol_against_the_service() {
    let rules = testkit::ASM_EXAMPLE_RULES;
    let (svc, up) = (
        Service::start(&[], &[("RATE_LIMIT_CONFIG", rules)]),
        upstream(),
    );
    let config = json!({
        "service": {"cluster": "ratelimit", "protocol": "asm"},
        "limits": [{"name": "user-type", "key": "{{request.headers.user-type}}"}]
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |user_type: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("user-type", user_type)],
            &json!({}),
        )
    };
    assert_eq!(ask("regular-user").status, 200);
    let spent = json!({"ratelimit_keys": ["regular-user"], "prompt_tokens": 10, "completion_tokens": 990, "total_tokens": 1000});
    assert_eq!(
        http::post_json(svc.port, "/update_ratelimit_record", &[], &spent).status,
        200
    );
    let denied = ask("regular-user");
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "regular-user is being rate-limited");
    assert_eq!(ask("subscriber").status, 200);
}

#[test]
fn service_stopped_follows_failure_mode() {
    let (mut svc, up) = (Service::start(&[], &[]), upstream());
    let config = json!({
        "service": {"cluster": "ratelimit", "failure_mode": "deny", "timeout_ms": 300},
        "limits": [{"name": "g", "key": "", "tokens": 1000, "window": "1m"}]
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    assert_eq!(
        http::post_json(e.port, "/v1/x", &[], &json!({})).status,
        200
    );
    assert!(svc.terminate().success());
    let r = http::post_json(e.port, "/v1/x", &[], &json!({}));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
    assert_eq!(e.metric("failure_mode_denied"), 1);
}

/// An upstream whose every answer used 60 tokens.
fn sixty_token_upstream() -> Server {
    Server::start(|_| {
        json_reply(
            200,
            json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 60, "total_tokens": 60}}),
        )
    })
}

/// Envoy AI Gateway's "per user, for one model" rule (`x-user-id` and `x-ai-eg-model:
/// gpt-4o` descriptors) written as a limit with a `when` condition: gpt-4o requests are capped
/// per user, other models are not, and no composite key is needed.
#[test]
fn a_limit_for_one_model_per_user() {
    let svc = Service::start(&[], &[]);
    let up = sixty_token_upstream();
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "gpt-4o-per-user", "key": "{{request.headers.x-user-id}}", "tokens": 100, "window": "1h",
                    "when": {"model": {"exact": "gpt-4o"}, "path": {"prefix": "/v1/chat/"}}}]
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |model: &str, path: &str| {
        http::post_json(
            e.port,
            path,
            &[("x-user-id", "ann")],
            &json!({"model": model}),
        )
        .status
    };
    assert_eq!(ask("gpt-4o", "/v1/chat/completions"), 200);
    svc.await_remaining("gpt-4o-per-user", "ann", 40);
    assert_eq!(ask("gpt-4o", "/v1/chat/completions"), 200, "40 left admits");
    svc.await_remaining("gpt-4o-per-user", "ann", 0);
    assert_eq!(ask("gpt-4o", "/v1/chat/completions"), 429);
    // Another model, or another path, is not under this limit.
    assert_eq!(ask("gpt-4o-mini", "/v1/chat/completions"), 200);
    assert_eq!(ask("gpt-4o", "/v1/embeddings"), 200);
    assert_eq!(e.metric("requests_unlimited"), 2);
}

/// A client cannot step around a model's limit by making its body unreadable to the plugin: a
/// body past `max_request_body_bytes` (which the upstream still serves) is counted by
/// `when.model` limits and under `(unreadable)` in a `{{llm.model}}` key, and a repeated
/// `model` is read as the upstream reads it, the last one.
#[test]
fn a_model_the_plugin_cannot_read_is_no_way_around_its_limit() {
    let svc = Service::start(&[], &[]);
    let up = sixty_token_upstream();
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "max_request_body_bytes": 1024,
        "limits": [
            {"name": "gpt-4o-per-user", "key": "{{request.headers.x-user-id}}", "tokens": 100, "window": "1h",
             "when": {"model": {"exact": "gpt-4o"}}},
            {"name": "per-model", "key": "{{llm.model}}", "tokens": 1000, "window": "1h"}
        ]
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let send = |body: &[u8]| {
        http::send(
            e.port,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json"), ("x-user-id", "ann")],
            body,
        )
        .status
    };
    let padded =
        json!({"messages": [{"role": "user", "content": "x".repeat(4096)}], "model": "gpt-4o"});
    assert_eq!(send(padded.to_string().as_bytes()), 200);
    svc.await_remaining("gpt-4o-per-user", "ann", 40);
    svc.await_remaining("per-model", "(unreadable)", 940);
    assert_eq!(e.metric("request_body_unreadable"), 1);
    // Python, Go and JavaScript parsers take the last `model`.
    assert_eq!(send(br#"{"model": "gpt-4o-mini", "model": "gpt-4o"}"#), 200);
    svc.await_remaining("gpt-4o-per-user", "ann", 0);
    svc.await_remaining("per-model", "gpt-4o", 940);
    assert_eq!(send(br#"{"model": "gpt-4o"}"#), 429);
    assert_eq!(e.metric("requests_unlimited"), 0);
}

/// Cached prompt tokens are their own count: OpenAI's `prompt_tokens_details.cached_tokens`
/// weighs `cached_prompt` (here a tenth), and the report carries the breakdown, reasoning
/// tokens included.
#[test]
fn cached_prompt_tokens_weigh_what_the_configuration_says() {
    let svc = Service::start(&[], &[]);
    let real = svc.port;
    let seen = Server::start(move |req| http::forward(real, req));
    let up = Server::start(|_| {
        json_reply(
            200,
            json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                   "prompt_tokens_details": {"cached_tokens": 80},
                   "completion_tokens_details": {"reasoning_tokens": 30}}}),
        )
    });
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}],
        "usage": {"count": {"prompt": 1, "cached_prompt": 0.1, "completion": 1}}
    });
    let e = Envoy::start(
        &config,
        &[
            cluster("ratelimit", seen.port),
            cluster("upstream", up.port),
        ],
    );
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "ann")],
        &json!({"model": "m"}),
    );
    assert_eq!(r.status, 200);
    // 20 fresh prompt tokens + 80 cached × 0.1 + 50 completion tokens.
    svc.await_remaining("user", "ann", 1000 - 78);
    let report = seen.reports()[0].json();
    assert_eq!(
        report["reports"][0]["usage"],
        json!({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
               "cached_prompt_tokens": 80, "reasoning_tokens": 30})
    );
}

/// A denial in the error shape of the request's API: Anthropic's on `/v1/messages`, with its
/// rate-limit headers; Gemini's on `…:generateContent`; OpenAI's elsewhere.
#[test]
fn each_api_is_denied_in_its_own_shape() {
    let (svc, llm) = (Service::start(&[], &[]), testkit::service::mock_llm());
    let c = serde_json::json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1, "window": "1h"}]
    });
    let e = testkit::envoy::Envoy::start(
        &c,
        &[
            testkit::envoy::cluster("ratelimit", svc.port),
            testkit::envoy::cluster("upstream", llm.port),
        ],
    );
    let ask = |path: &str| {
        testkit::http::post_json(
            e.port,
            path,
            &[
                ("x-user", "ann"),
                ("x-mock-prompt-tokens", "5"),
                ("x-mock-completion-tokens", "5"),
            ],
            &serde_json::json!({"model": "m"}),
        )
    };
    assert_eq!(ask("/v1/chat/completions").status, 200);
    svc.await_remaining("user", "ann", 0);
    let anthropic = ask("/v1/messages");
    assert_eq!(anthropic.status, 429);
    assert_eq!(anthropic.json()["type"], "error");
    assert_eq!(anthropic.json()["error"]["type"], "rate_limit_error");
    assert_eq!(
        anthropic.header("anthropic-ratelimit-tokens-remaining"),
        Some("0")
    );
    assert!(anthropic
        .header("anthropic-ratelimit-tokens-reset")
        .is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    let gemini = ask("/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(gemini.status, 429);
    assert_eq!(gemini.json()["error"]["status"], "RESOURCE_EXHAUSTED");
    let openai = ask("/v1/chat/completions");
    assert_eq!(openai.json()["error"]["code"], "rate_limit_exceeded");
}
