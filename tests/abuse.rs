//! Hostile clients and odd upstreams, end to end: each gets a safe outcome, and nobody escapes
//! a limit or crashes the plugin.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, reply, Server};
use testkit::service::{mock_llm, Service};

const BUDGET: u64 = 1_000_000;

fn config(extra: Value) -> Value {
    let mut c = json!({
        "service": {"cluster": "ratelimit", "failure_mode": "allow"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"}]
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn spent(port: u16, user: &str) -> u64 {
    let path = format!("/v1/quota?limit=user&value={}", http::percent_encode(user));
    let q = http::send(port, "GET", &path, &[], b"").json();
    BUDGET - q["meters"][0]["remaining"].as_u64().unwrap_or(BUDGET)
}

fn await_spent(port: u16, user: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while spent(port, user) != want {
        assert!(
            Instant::now() < deadline,
            "{user}: charged {}, want {want}",
            spent(port, user)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_huge_key_value_is_still_limited() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let mut c = config(json!({}));
    c["limits"][0]["tokens"] = json!(10);
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // 40 KB of key: far over what the service accepts as a value. Sending it as is would make
    // every check fail, and `failure_mode: allow` would let this client through unlimited.
    let huge = "k".repeat(40_000);
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", huge.as_str()),
                ("x-mock-prompt-tokens", "5"),
                ("x-mock-completion-tokens", "5"),
            ],
            &json!({}),
        )
        .status
    };
    assert_eq!(ask(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.metric("reports.sent") < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ask(), 429);
    assert_eq!(e.metric("failure_mode_allowed"), 0);
}

/// The scheme of `Authorization` is case-insensitive and may be followed by several spaces, so
/// an upstream takes `bEaReR   sk-1` as `Bearer sk-1`: every spelling draws on one budget.
#[test]
fn respelling_the_authorization_header_is_not_a_fresh_budget() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "key", "key": "{{request.headers.authorization}}", "tokens": 10, "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let ask = |authorization: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("authorization", authorization),
                ("x-mock-prompt-tokens", "5"),
                ("x-mock-completion-tokens", "5"),
            ],
            &json!({}),
        )
        .status
    };
    assert_eq!(ask("Bearer sk-1"), 200);
    svc.await_remaining("key", "Bearer sk-1", 0);
    for respelled in ["bearer sk-1", "BEARER    sk-1", "bEaReR \t sk-1"] {
        assert_eq!(ask(respelled), 429, "{respelled:?}");
    }
    // Another credential is another budget.
    assert_eq!(ask("Bearer sk-2"), 200);
}

#[test]
fn separators_and_template_syntax_in_values_are_just_text() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = Envoy::start(
        &config(json!({})),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let users = [
        "a:b",
        "a",
        "b",
        "a|b",
        "{{request.headers.x-user}}",
        "ünï çødé",
        "a%3Ab",
    ];
    for (i, user) in users.iter().enumerate() {
        let tokens = (i as u64 + 1).to_string();
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", user),
                ("x-mock-prompt-tokens", "0"),
                ("x-mock-completion-tokens", tokens.as_str()),
            ],
            &json!({}),
        );
        assert_eq!(r.status, 200);
    }
    // Every value has its own counter, holding exactly its own usage.
    for (i, user) in users.iter().enumerate() {
        await_spent(svc.port, user, i as u64 + 1);
    }
}

#[test]
fn a_request_that_lies_about_streaming_is_charged_from_what_comes_back() {
    let svc = Service::start(&[], &[]);
    // Whatever the request says, this upstream streams when the path says so.
    let up = Server::start(|req| {
        if req.path.contains("sse") {
            reply(
                200,
                "application/json",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":9,\"total_tokens\":11}}\n\ndata: [DONE]\n\n",
            )
        } else {
            reply(
                200,
                "text/event-stream",
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5}}"#,
            )
        }
    });
    let e = Envoy::start(
        &config(json!({})),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |path: &str, user: &str, stream: bool| {
        http::post_json(
            e.port,
            path,
            &[("x-user", user)],
            &json!({"stream": stream}),
        )
        .status
    };
    assert_eq!(
        ask("/v1/sse/chat/completions", "says-json-gets-sse", false),
        200
    );
    assert_eq!(
        ask("/v1/json/chat/completions", "says-sse-gets-json", true),
        200
    );
    await_spent(svc.port, "says-json-gets-sse", 11);
    await_spent(svc.port, "says-sse-gets-json", 5);
}

#[test]
fn odd_usage_numbers_are_never_trusted_blindly() {
    let svc = Service::start(&[], &[]);
    let up = Server::start(|req| {
        let usage = match req.header("x-usage").unwrap_or_default() {
            "negative" => r#"{"prompt_tokens":-5,"completion_tokens":-7,"total_tokens":-12}"#,
            "fraction" => r#"{"prompt_tokens":2.9,"completion_tokens":10.5,"total_tokens":13.4}"#,
            "huge" => {
                r#"{"prompt_tokens":1e30,"completion_tokens":99999999999999999999999,"total_tokens":1e300}"#
            }
            _ => r#""lots""#,
        };
        reply(
            200,
            "application/json",
            format!(r#"{{"choices":[{{"message":{{"content":"12345678"}}}}],"usage":{usage}}}"#),
        )
    });
    let e = Envoy::start(
        &config(json!({})),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    for kind in ["negative", "fraction", "huge", "string"] {
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", kind), ("x-usage", kind)],
            &json!({}),
        );
        assert_eq!(r.status, 200);
    }
    // Fractions round down; numbers that cannot be token counts are ignored, and the
    // response is charged as if it had no usage: the request's 2 bytes → 1 token, the 8
    // bytes of text → 2 tokens.
    await_spent(svc.port, "fraction", 13);
    for kind in ["negative", "huge", "string"] {
        await_spent(svc.port, kind, 1 + 2);
    }
    assert_eq!(e.metric("usage.estimated"), 3);
}

#[test]
fn a_multi_megabyte_event_and_a_deeply_nested_body() {
    let svc = Service::start(&[], &[]);
    let text = "x".repeat(8 << 20);
    let event = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}}}\n\ndata: [DONE]\n\n"
    );
    let up = Server::start(move |_| reply(200, "text/event-stream", event.clone()));
    let e = Envoy::start(
        &config(json!({"limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"},
            {"name": "model", "key": "{{llm.model}}", "tokens": BUDGET, "window": "1h"}]})),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let before = {
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", "warm")],
            &json!({"model": "m"}),
        );
        assert_eq!(r.status, 200);
        await_spent(svc.port, "warm", 7);
        e.metric("vm_memory_bytes")
    };
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "big")],
        &json!({"model": "m"}),
    );
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 8 << 20);
    await_spent(svc.port, "big", 7);
    assert!(
        e.metric("vm_memory_bytes") <= before + (1 << 20),
        "one event must not be buffered"
    );

    // 100,000 levels of nesting in the request body: skipped without recursion, the model
    // beside it is still read and limited.
    let deep = format!(
        "{{\"model\":\"m\",\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let r = http::send(
        e.port,
        "POST",
        "/v1/chat/completions",
        &[("x-user", "deep"), ("content-type", "application/json")],
        deep.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(e.metric("request_body_unreadable"), 0);
    await_spent(svc.port, "deep", 7);
    let q = http::send(svc.port, "GET", "/v1/quota?limit=model&value=m", &[], b"").json();
    assert_eq!(q["meters"][0]["remaining"], BUDGET - 3 * 7);
}

#[test]
fn control_characters_and_repeated_headers() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = Envoy::start(
        &config(json!({})),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // Envoy refuses a header with a control character before any filter runs.
    let r = http::send(
        e.port,
        "POST",
        "/v1/chat/completions",
        &[("x-user", "a\u{1}b"), ("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 400);
    assert_eq!(e.metric("requests_matched"), 0);
    // A repeated key header: the first one counts, every time.
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[
            ("x-user", "first"),
            ("x-user", "second"),
            ("x-mock-prompt-tokens", "1"),
            ("x-mock-completion-tokens", "1"),
        ],
        &json!({}),
    );
    assert_eq!(r.status, 200);
    await_spent(svc.port, "first", 2);
    assert_eq!(spent(svc.port, "second"), 0);
}
