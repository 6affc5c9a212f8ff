//! The wire contract, proved against the real service: the plugin's own encoders, fed the most
//! extreme requests a configuration and a client can produce, build only requests the service
//! answers with 200; a configuration beyond the bounds is refused when it loads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::borrow::Cow;

use llm_token_ratelimit::config::{Config, Reserve};
use llm_token_ratelimit::limits::descriptors;
use llm_token_ratelimit::protocol::Outbound;
use llm_token_ratelimit::request::BodyFacts;
use llm_token_ratelimit::reserve::{reserve, Rule};
use llm_token_ratelimit::template::{Attribute, AttributeSource};
use serde_json::json;
use testkit::http;
use testkit::service::Service;
use wire::{Report, SeqId, UsageFigures, MAX_AMOUNT, MAX_DESCRIPTORS, MAX_RATES, MAX_WINDOW_S};

/// A client that sends the longest, least ASCII value it can for every attribute.
struct Hostile;

impl AttributeSource for Hostile {
    fn attribute(&self, _: &Attribute) -> Option<Cow<'_, str>> {
        Some(Cow::Owned("ü\"\\\u{1}中".repeat(20_000)))
    }
}

fn limits(n: usize, with_rates: bool) -> serde_json::Value {
    let rates: Vec<_> = (0..MAX_RATES)
        .map(|i| json!({"tokens": MAX_AMOUNT - i as u64, "window": MAX_WINDOW_S - i as u64}))
        .collect();
    (0..n)
        .map(|i| {
            // The longest name the contract allows, in two-byte characters.
            let name = format!("{i:04}{}", "é".repeat((wire::MAX_TEXT - 4) / 2));
            let mut l = json!({"name": name, "key": format!("{{{{request.headers.k{i}}}}}")});
            if with_rates {
                l["rates"] = json!(rates);
            }
            l
        })
        .collect()
}

fn config(limits: serde_json::Value) -> Result<Config, String> {
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "limits": limits,
        "reserve": {"tokens": "max_tokens", "max": MAX_AMOUNT}
    });
    Config::parse(c.to_string().as_bytes()).map_err(|e| e.to_string())
}

fn send(svc: &Service, call: Outbound) -> http::Response {
    let Outbound::Http(call) = call else {
        panic!("protocol v1 speaks HTTP")
    };
    http::send(
        svc.port,
        call.method,
        &call.path,
        &[("content-type", "application/json")],
        call.body.as_deref().unwrap_or_default(),
    )
}

#[test]
fn more_limits_than_a_check_may_carry_are_refused_at_load() {
    let err = config(limits(MAX_DESCRIPTORS + 1, true)).unwrap_err();
    assert!(
        err.contains("`limits`") && err.contains("at most 64"),
        "{err}"
    );
    let mut too_many_rates = limits(1, true);
    too_many_rates[0]["rates"]
        .as_array_mut()
        .unwrap()
        .push(json!({"tokens": 1, "window": 1}));
    let err = config(too_many_rates).unwrap_err();
    assert!(
        err.contains("`limits[0]`") && err.contains("rates"),
        "{err}"
    );
    let mut long_name = limits(1, false);
    long_name[0]["name"] = json!("x".repeat(wire::MAX_TEXT + 1));
    assert!(config(long_name).unwrap_err().contains("`limits[0]`"));
}

#[test]
fn the_most_extreme_requests_the_plugin_builds_are_answered_200() {
    let svc = Service::start(&[], &[]);
    let huge = BodyFacts::parse(br#"{"max_tokens": 1e300, "max_completion_tokens": -1}"#).unwrap();
    for with_rates in [true, false] {
        let config = config(limits(MAX_DESCRIPTORS, with_rates)).unwrap();
        let ds = descriptors(&config.limits, &Hostile);
        assert_eq!(ds.len(), MAX_DESCRIPTORS);
        let rule = Rule {
            wanted: Reserve::MaxTokens,
            max: config.reserve_max,
            default: config.reserve_default,
        };
        let asked = Some((&huge, llm_token_ratelimit::body::Api::Chat));
        let reserved = reserve(rule, config.service.protocol, asked, &ds).tokens;
        assert_eq!(reserved, MAX_AMOUNT);
        let id = SeqId {
            source: u64::MAX,
            seq: wire::MAX_SEQ - u64::from(with_rates),
        }
        .format();
        let wire = config.service.protocol.wire();
        let r = send(
            &svc,
            wire.check_call(
                &config.service,
                &ds,
                wire::Amount::new(reserved, MAX_AMOUNT),
                None,
                Some(&id),
            ),
        );
        assert_eq!(r.status, 200, "check (rates: {with_rates}): {}", r.text());
        let report = Report {
            spend: Vec::new(),
            id: id.clone(),
            descriptors: ds.clone(),
            used: wire::Amount::new(MAX_AMOUNT, MAX_AMOUNT),
            reserved: wire::Amount::new(MAX_AMOUNT, MAX_AMOUNT),
            reserved_at_ms: Some(u64::MAX),
            release: Some(id.clone()),
            usage: Some(UsageFigures {
                prompt_tokens: u64::MAX,
                completion_tokens: u64::MAX,
                total_tokens: u64::MAX,
                ..Default::default()
            }),
        };
        let batch: Vec<&Report> = vec![&report; 3];
        let r = send(&svc, wire.report_call(&config.service, &batch).unwrap());
        assert_eq!(r.status, 200, "report (rates: {with_rates}): {}", r.text());
        let answer = r.json();
        let outcomes: Vec<&str> = answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["applied", "duplicate", "duplicate"],
            "{}",
            r.text()
        );
    }
}
