//! `reserve.trim` in Envoy with the real service: a request whose cap does not fit is served
//! with the cap that does, written into the request the upstream reads; concurrent trimmed
//! requests never spend past a budget, in tokens or in money.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Behaviour, Response, Server};
use testkit::service::Service;

fn post(port: u16, user: &str, body: &serde_json::Value) -> Response {
    http::send(
        port,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json"), ("x-user", user)],
        body.to_string().as_bytes(),
    )
}

/// An upstream that uses every output token it is allowed (and bills a prompt of `prompt`
/// tokens), after `delay_ms`.
fn greedy_upstream(prompt: u64, delay_ms: u64) -> Server {
    Server::start(move |req| {
        let cap = req.json()["max_tokens"].as_u64().unwrap_or(4096);
        Behaviour::Delay(
            std::time::Duration::from_millis(delay_ms),
            Box::new(http::json_reply(
                200,
                json!({"choices": [{"finish_reason": "length"}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": cap, "total_tokens": prompt + cap}}),
            )),
        )
    })
}

fn config(limits: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "service": {"cluster": "ratelimit"},
        "reserve": {"tokens": "max_tokens", "trim": true, "min": 20},
        "limits": limits,
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    c
}

/// 300 tokens left and a request for 1,000: the upstream sees a cap of 300 less the prompt's
/// estimate, the client gets its 200 and the header naming the cap, and the budget ends spent,
/// not overdrawn.
#[test]
fn a_request_that_does_not_fit_is_served_with_the_cap_that_does() {
    let svc = Service::start(&[], &[]);
    // The upstream bills a 5-token prompt (the plugin estimates more, from the body's size).
    let up = greedy_upstream(5, 0);
    let e = Envoy::start(
        &config(
            json!([{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]),
            json!({}),
        ),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    // 695 output tokens and a prompt of 5: 700 spent.
    let r = post(e.port, "ann", &json!({"model": "m", "max_tokens": 695}));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-granted-tokens"), None, "it fitted");
    svc.await_remaining("user", "ann", 300);

    let body = json!({"model": "m", "max_tokens": 1000});
    let prompt_estimate = (body.to_string().len() as u64).div_ceil(4);
    let r = post(e.port, "ann", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = up.requests().last().unwrap().json()["max_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(seen, 300 - prompt_estimate);
    assert_eq!(
        r.header("x-ratelimit-granted-tokens"),
        Some(seen.to_string().as_str())
    );
    // Charged what the upstream billed: the prompt and the granted output.
    svc.await_remaining("user", "ann", 300 - 5 - seen);
    assert_eq!(e.metric("checks_trimmed"), 1);
    assert_eq!(e.metric("request_caps_written"), 1);

    // Less than `reserve.min` left: refused as before.
    let r = post(e.port, "ann", &json!({"model": "m", "max_tokens": 1000}));
    assert_eq!(r.status, 429);
}

/// Ten concurrent requests for 100 output tokens each on 300 tokens: what the upstream is
/// allowed to produce, with the prompts, adds up to at most 300, and what is spent too.
#[test]
fn concurrent_trims_never_add_up_past_the_budget() {
    let svc = Service::start(&[], &[]);
    let up = greedy_upstream(0, 500);
    let e = Envoy::start(
        &config(
            json!([{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 300, "window": "1h"}]),
            json!({"usage": {"count": "completion"}}),
        ),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let caps: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| s.spawn(|| post(e.port, "bob", &json!({"model": "m", "max_tokens": 100}))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|r| r.status == 200)
            .map(|r| {
                r.header("x-ratelimit-granted-tokens")
                    .map_or(100, |c| c.parse().unwrap())
            })
            .collect()
    });
    let granted: u64 = caps.iter().sum();
    let seen: u64 = up
        .requests()
        .iter()
        .map(|r| r.json()["max_tokens"].as_u64().unwrap())
        .sum();
    assert!(
        granted <= 300 && seen <= 300,
        "{caps:?}: {granted}, upstream {seen}"
    );
    assert_eq!(
        granted, 300,
        "the budget is used to the last token: {caps:?}"
    );
    svc.await_remaining("user", "bob", 0);
}

/// A budget in money the same: 0.50 USD left, a request whose cap would cost 2.00 is served
/// with the cap 0.50 pays for, and the spend ends within the budget.
#[test]
fn a_budget_in_money_is_trimmed_alike() {
    let svc = Service::start(&[], &[]);
    let up = greedy_upstream(0, 0);
    let e = Envoy::start(
        &config(
            json!([{"name": "spend", "key": "{{request.headers.x-user}}", "unit": "cost", "budget": "1.00", "window": "1d"}]),
            // 1,000 USD per million output tokens: 1,000 micro units a token.
            json!({"prices": {"currency": "USD", "models": [{"model": "m", "input": "0", "output": "1000"}]}}),
        ),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    // 500 tokens: 0.50 spent.
    let r = post(e.port, "cat", &json!({"model": "m", "max_tokens": 500}));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-granted-tokens"), None);
    svc.await_remaining("spend", "cat", 500_000);
    // 2,000 tokens would cost 2.00: 500 are granted.
    let r = post(e.port, "cat", &json!({"model": "m", "max_tokens": 2000}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-ratelimit-granted-tokens"), Some("500"));
    assert_eq!(
        up.requests().last().unwrap().json()["max_tokens"].as_u64(),
        Some(500)
    );
    svc.await_remaining("spend", "cat", 0);
}

/// A cap beyond the whole budget, on a budget nobody has touched, is trimmed to the budget
/// (an untrimmed reserve that large is admitted whole on a whole budget): the upstream never
/// sees more than the budget pays for.
#[test]
fn a_cap_beyond_a_whole_budget_is_trimmed_to_it() {
    let svc = Service::start(&[], &[]);
    let up = greedy_upstream(0, 0);
    let e = Envoy::start(
        &config(
            json!([{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]),
            json!({"usage": {"count": "completion"}}),
        ),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let r = post(
        e.port,
        "dan",
        &json!({"model": "m", "max_tokens": 1_000_000_000_000u64}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-granted-tokens"), Some("1000"));
    assert_eq!(
        up.requests().last().unwrap().json()["max_tokens"].as_u64(),
        Some(1000)
    );
    svc.await_remaining("user", "dan", 0);
}
