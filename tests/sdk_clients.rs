//! The gateway driven by the SDKs users run: `openai` and `anthropic` from PyPI (pinned in the
//! Makefile, installed by `make test-deps` in `.deps/sdk`), calling the plugin in a real Envoy
//! with the real service and the mock LLM (`tests/sdk/client.py` makes one call per run).
//! Answers and streams work through the gateway and are charged; a denial raises each SDK's own
//! error class with our message and the headers that SDK reads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::service::{mock_llm, Service};

fn python() -> PathBuf {
    let path = std::env::var_os("SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::repo().join(".deps/sdk/bin/python"));
    assert!(
        path.exists(),
        "no SDK virtualenv at {}: run `make test-deps` (or set SDK_PYTHON)",
        path.display()
    );
    path
}

/// One call with `sdk` (`openai`, `anthropic`): `kind` is `chat`, `stream` or `error`.
fn call(sdk: &str, kind: &str, port: u16, headers: &[(&str, &str)]) -> Value {
    let script = testkit::repo().join("tests/sdk/client.py");
    let mut args = vec![sdk.to_string(), kind.to_string(), port.to_string()];
    // Every answer: 10 prompt and 20 completion tokens.
    for (k, v) in [
        ("x-mock-prompt-tokens", "10"),
        ("x-mock-completion-tokens", "20"),
    ]
    .iter()
    .chain(headers)
    {
        args.push(format!("{k}={v}"));
    }
    let out = Command::new(python())
        .arg(script)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sdk} {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn config() -> Value {
    json!({
        "service": {"cluster": "ratelimit"},
        "prices": {"currency": "USD", "models": [{"model": "*", "input": "1.00", "output": "1.00"}]},
        "limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 50, "window": "1h"},
            {"name": "team", "key": "{{request.headers.x-team}}", "unit": "cost",
             "budget": "0.00005", "window": "month"},
            {"name": "blocked", "key": "{{request.headers.x-blocked}}", "tokens": 1,
             "window": "1h", "deny_status": 403}
        ]
    })
}

struct Gateway {
    svc: Service,
    _llm: Service,
    envoy: Envoy,
}

fn gateway() -> Gateway {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let envoy = Envoy::start(
        &config(),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    Gateway {
        svc,
        _llm: llm,
        envoy,
    }
}

fn header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v["headers"][name].as_str()
}

/// A 50-token budget, answers of 30 tokens: an answer, a stream (usage from the SDK's own
/// last chunk), then the SDK's `RateLimitError` with our message and quota headers.
#[test]
fn openai_sdk_answers_streams_and_rate_limit_error() {
    let g = gateway();
    let port = g.envoy.port;
    let who = [("x-user", "oa")];
    let answer = call("openai", "chat", port, &who);
    assert_eq!(answer["usage"], 30);
    assert_eq!(header(&answer, "x-ratelimit-limit-tokens"), Some("50"));
    g.svc.await_remaining("user", "oa", 20);
    let stream = call("openai", "stream", port, &who);
    assert_eq!(stream["usage"], 30, "{stream}");
    assert!(stream["text_bytes"].as_u64().unwrap() > 0);
    g.svc.await_remaining("user", "oa", 0);
    let e = call("openai", "error", port, &who);
    assert_eq!(e["class"], "openai.RateLimitError", "{e}");
    assert_eq!(e["status"], 429);
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit reached for tokens (user): limit 50, remaining 0"),
        "{e}"
    );
    assert_eq!(header(&e, "x-ratelimit-remaining-tokens"), Some("0"));
    // Within two windows: a sliding window forgets the overshoot of the last answer gradually.
    let retry: u64 = header(&e, "retry-after").unwrap().parse().unwrap();
    assert!((1..=7200).contains(&retry), "{e}");
}

/// The same with Anthropic's SDK on `/v1/messages`: its `RateLimitError` carries our message
/// (not a dump of an OpenAI-shaped body), `rate_limit_error`, and the
/// `anthropic-ratelimit-tokens-*` headers Anthropic's API sends.
#[test]
fn anthropic_sdk_answers_streams_and_rate_limit_error() {
    let g = gateway();
    let port = g.envoy.port;
    let who = [("x-user", "an")];
    let answer = call("anthropic", "chat", port, &who);
    assert_eq!(answer["usage"], 30, "{answer}");
    g.svc.await_remaining("user", "an", 20);
    let stream = call("anthropic", "stream", port, &who);
    assert_eq!(stream["usage"], 30, "{stream}");
    assert!(stream["text_bytes"].as_u64().unwrap() > 0);
    g.svc.await_remaining("user", "an", 0);
    let e = call("anthropic", "error", port, &who);
    assert_eq!(e["class"], "anthropic.RateLimitError", "{e}");
    assert_eq!(e["status"], 429);
    assert_eq!(e["body"]["type"], "error");
    assert_eq!(e["body"]["error"]["type"], "rate_limit_error");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("Rate limit reached for tokens (user): limit 50, remaining 0"),
        "{e}"
    );
    assert!(
        !message.contains("rate_limit_exceeded"),
        "not OpenAI's shape: {e}"
    );
    assert_eq!(header(&e, "anthropic-ratelimit-tokens-limit"), Some("50"));
    assert_eq!(
        header(&e, "anthropic-ratelimit-tokens-remaining"),
        Some("0")
    );
    let reset = header(&e, "anthropic-ratelimit-tokens-reset").unwrap();
    assert!(
        reset.len() == 20 && reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
        "RFC 3339: {reset}"
    );
    assert!(header(&e, "retry-after").is_some(), "{e}");
}

/// A spent budget in money is OpenAI's `insufficient_quota` (which its SDK does not retry), and
/// a limit with `deny_status: 403` raises each SDK's `PermissionDeniedError`.
#[test]
fn spent_money_and_a_403_limit_raise_the_sdks_own_errors() {
    let g = gateway();
    let port = g.envoy.port;
    // 30 tokens at $1 per million each way: 0.00003 of a 0.00005 budget.
    let team = [("x-team", "t1")];
    call("openai", "chat", port, &team);
    g.svc.await_remaining("team", "t1", 20);
    call("openai", "chat", port, &team);
    g.svc.await_remaining("team", "t1", 0);
    let e = call("openai", "error", port, &team);
    assert_eq!(e["class"], "openai.RateLimitError", "{e}");
    assert_eq!(e["code"], "insufficient_quota");
    assert_eq!(header(&e, "x-ratelimit-remaining-cost"), Some("0.00"));

    let blocked = [("x-blocked", "b")];
    call("openai", "chat", port, &blocked);
    g.svc.await_remaining("blocked", "b", 0);
    let e = call("openai", "error", port, &blocked);
    assert_eq!(e["class"], "openai.PermissionDeniedError", "{e}");
    assert_eq!(e["status"], 403);
    let e = call("anthropic", "error", port, &blocked);
    assert_eq!(e["class"], "anthropic.PermissionDeniedError", "{e}");
    assert_eq!(e["body"]["error"]["type"], "permission_error");
}

/// `stream_cutoff`: a 100-token budget and an upstream that streams 400 output tokens past any
/// cap. Each SDK consumes the stream the plugin ends, without an error, and sees the stop
/// reason its API gives at an output cap; what it is charged is what it received.
#[test]
fn sdks_consume_a_cut_stream_and_see_the_stop_reason() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let envoy = Envoy::start(
        &json!({
            "service": {"cluster": "ratelimit"},
            "stream_cutoff": true,
            "limits": [
                {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1h"},
                {"name": "meter", "key": "{{request.headers.x-user}}", "tokens": 1000000, "window": "1h"}
            ]
        }),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let runaway = [
        ("x-mock-ignore-cap", "1"),
        ("x-mock-completion-tokens", "400"),
        ("x-mock-piece-bytes", "16"),
        ("x-mock-delay-ms", "2"),
    ];
    for (sdk, kind, user, stop) in [
        ("openai", "stream", "cut-chat", "length"),
        ("openai", "responses", "cut-resp", "max_output_tokens"),
        ("anthropic", "stream", "cut-msg", "max_tokens"),
    ] {
        let mut headers = runaway.to_vec();
        headers.push(("x-user", user));
        let got = call(sdk, kind, envoy.port, &headers);
        assert_eq!(got["stop"], stop, "{sdk} {kind}: {got}");
        let charged = got["usage"].as_u64().unwrap();
        assert!(
            (100..=100 + 4).contains(&charged),
            "{sdk} {kind}: at most the budget and the event (4 tokens) that passed it: {got}"
        );
        // The usage the SDK saw in the end is what the service charged.
        svc.await_remaining("meter", user, 1_000_000 - charged);
        let text = got["text_bytes"].as_u64().unwrap();
        assert!(text > 0 && text < 400 * 4, "{sdk} {kind}: {got}");
    }
    assert_eq!(envoy.metric("streams_cut"), 3);
}
