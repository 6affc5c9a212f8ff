//! The Grafana dashboard in `deploy/grafana/` queries metrics that exist: after some traffic
//! through Envoy, the plugin and the service, every metric name in every panel's query is in
//! the service's `/metrics` or in Envoy's `/stats/prometheus`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeSet;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Server};
use testkit::service::Service;

/// The metric names a PromQL expression reads: label matchers (`{...}`) and grouping clauses
/// (`by (...)`) dropped, every remaining identifier with an underscore that is not a function.
fn metric_names(expr: &str) -> Vec<String> {
    const FUNCTIONS: &[&str] = &["histogram_quantile", "label_replace", "sort_desc"];
    let mut plain = String::new();
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if c == '{' {
            rest = rest.split_once('}').map_or("", |(_, r)| r);
        } else if let Some(r) = rest.strip_prefix("by (") {
            rest = r.split_once(')').map_or("", |(_, r)| r);
        } else {
            plain.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.contains('_') && !FUNCTIONS.contains(w))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_panel_queries_a_metric_that_exists() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(testkit::repo().join("deploy/grafana/llm-token-ratelimit.json"))
            .unwrap(),
    )
    .unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let names = metric_names(t["expr"].as_str().unwrap());
            assert!(!names.is_empty(), "no metric in {}", t["expr"]);
            wanted.extend(names);
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    let svc = Service::start(&[], &[]);
    let up = Server::start(|_| {
        json_reply(
            200,
            json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}}),
        )
    });
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "prices": {"currency": "USD", "models": [{"model": "m", "input": "1", "output": "1"}]},
        "limits": [{"name": "per-user", "key": "{{request.headers.x-user}}", "tokens": 15, "window": "1h"},
                   {"name": "spend", "key": "", "unit": "cost", "budget": "10", "window": "day"}]
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", "a")],
            &json!({"model": "m"}),
        )
        .status
    };
    assert_eq!(ask(), 200);
    svc.await_remaining("per-user", "a", 5);
    assert_eq!(ask(), 200);
    svc.await_remaining("per-user", "a", 0);
    assert_eq!(ask(), 429);

    let service_metrics = http::send(svc.port, "GET", "/metrics", &[], b"").text();
    let envoy_metrics = http::send(e.admin, "GET", "/stats/prometheus", &[], b"").text();
    let exists = |name: &str| {
        [&service_metrics, &envoy_metrics].iter().any(|text| {
            text.lines().any(|l| {
                !l.starts_with('#')
                    && l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
    };
    let missing: Vec<&String> = wanted.iter().filter(|n| !exists(n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}\nEnvoy's:\n{}",
        envoy_metrics
            .lines()
            .filter(|l| l.contains("llm_token_ratelimit") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
