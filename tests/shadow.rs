//! Shadow limits in Envoy with the real service: a limit with `"mode": "shadow"` is checked and
//! counted exactly, in tokens and in money, and never denies; a request it would have denied
//! is admitted, marked `x-ratelimit-shadow-denied`, counted by the plugin and the service, and
//! shown apart on the console.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http;
use testkit::service::{mock_llm, Service};

#[test]
fn a_shadow_limit_counts_and_marks_but_never_denies() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = Envoy::start(
        &json!({
            "service": {"cluster": "ratelimit"},
            "prices": {"currency": "USD", "models": [{"model": "*", "input": "1.00", "output": "1.00"}]},
            "limits": [
                {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"},
                {"name": "new-cap", "key": "{{request.headers.x-user}}", "tokens": 50, "window": "1h",
                 "mode": "shadow"},
                {"name": "new-spend", "key": "{{request.headers.x-user}}", "unit": "cost",
                 "budget": "0.00005", "window": "month", "mode": "shadow"}
            ]
        }),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // Each answer: 10 prompt and 20 completion tokens, 0.00003 USD.
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "ann"),
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-completion-tokens", "20"),
            ],
            &json!({"model": "m"}),
        )
    };
    let r = ask();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-shadow-denied"), None);
    svc.await_remaining("new-cap", "ann", 20);
    let r = ask();
    assert_eq!(
        r.header("x-ratelimit-shadow-denied"),
        None,
        "20 and 0.00002 left"
    );
    // Counted exactly: 60 of 50 tokens, 0.00006 of 0.00005 USD.
    svc.await_remaining("new-cap", "ann", 0);
    svc.await_remaining("user", "ann", 940);
    for _ in 0..3 {
        let r = ask();
        assert_eq!(r.status, 200, "a shadow limit never denies");
        assert_eq!(
            r.header("x-ratelimit-shadow-denied"),
            Some("new-cap,new-spend")
        );
        // The quota headers are the enforced limit's, not a shadow one's.
        assert!(
            r.header("x-ratelimit-remaining-tokens")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 850
        );
    }
    svc.await_remaining("user", "ann", 850);
    assert_eq!(e.metric("shadow_denied"), 3);
    assert_eq!(e.metric("checks_denied"), 0);
    let metrics = http::send(svc.port, "GET", "/metrics", &[], b"").text();
    for limit in ["new-cap", "new-spend"] {
        assert!(
            metrics.contains(&format!(
                "ratelimit_shadow_denied_total{{limit=\"{limit}\"}} 3"
            )),
            "{metrics}"
        );
    }
    // The console lists them apart from denials.
    let denials = http::send(svc.port, "GET", "/v1/console/denials", &[], b"").json();
    let list = denials["denials"].as_array().unwrap();
    assert!(
        !list.is_empty() && list.iter().all(|d| d["shadow"] == true),
        "{denials}"
    );
    // An enforced limit still denies.
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "ann")],
        &json!({"model": "m", "max_tokens": 5000}),
    );
    assert_eq!(
        r.status, 200,
        "no reservation: admitted, the enforced budget has room"
    );
}

/// Shadow limits need protocol v1: the other protocols cannot say which limit would have denied.
#[test]
fn a_shadow_limit_under_another_protocol_is_refused_at_load() {
    for service in [
        json!({"cluster": "ratelimit", "protocol": "asm"}),
        json!({"cluster": "ratelimit", "protocol": "envoy-rls", "domain": "llm"}),
    ] {
        let protocol = service["protocol"].clone();
        let config = json!({
            "service": service,
            "limits": [{"name": "new-cap", "key": "{{request.headers.x-user}}", "mode": "shadow"}]
        });
        let err = llm_token_ratelimit::config::Config::parse(config.to_string().as_bytes())
            .err()
            .unwrap_or_else(|| panic!("{protocol}: accepted"))
            .to_string();
        assert!(
            err.contains("limits[0].mode") && err.contains("needs protocol \"v1\""),
            "{protocol}: {err}"
        );
    }
}
