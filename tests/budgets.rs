//! Budgets in money and calendar windows, end to end: the plugin in a real Envoy prices each
//! response by the price table, the real service counts micro units in calendar months of a
//! time zone, on a manual clock so that a month's end is crossed in a second.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Behaviour, Response, Server};
use testkit::service::Service;

/// Every answer names the dated snapshot and uses 1,000 prompt and 500 completion tokens.
fn upstream() -> Server {
    Server::start(|_| {
        json_reply(
            200,
            json!({"id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "choices": [],
                   "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}),
        )
    })
}

/// A team budget and a per-user budget, both monthly in Shanghai, in US dollars. The table
/// prices the snapshot the upstream answers with below the alias the client asks for: at
/// $2.50 / $10 per million a request costs 0.0075 USD (at the alias's $5 / $15, 0.0125).
fn config() -> Value {
    json!({
        "service": {"cluster": "ratelimit"},
        "prices": {"currency": "USD", "models": [
            {"model": "gpt-4o-2024-08-06", "input": "2.50", "cached_input": "1.25", "output": "10.00"},
            {"model": "gpt-4o", "input": "5.00", "output": "15.00"}
        ]},
        "limits": [
            {"name": "team", "key": "{{request.headers.x-team}}", "unit": "cost", "budget": "0.03",
             "window": "month", "timezone": "Asia/Shanghai"},
            {"name": "user", "key": "{{request.headers.x-user}}", "unit": "cost", "budget": "0.015",
             "window": "month", "timezone": "Asia/Shanghai"},
            {"name": "tokens-per-minute", "key": "{{request.headers.x-user}}", "tokens": 100000, "window": "1m"}
        ]
    })
}

#[test]
fn a_budget_in_money_admits_what_it_pays_for_and_the_next_month_restores_it() {
    // An hour before December in Shanghai.
    let svc = Service::start(&["--manual-clock", "2026-11-30T23:00:00+08:00"], &[]);
    let up = upstream();
    let e = Envoy::start(
        &config(),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |user: &str, model: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-team", "team-a"), ("x-user", user)],
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    // bob's own budget pays for two requests (0.015 / 0.0075): priced as the snapshot.
    let first = ask("bob", "gpt-4o");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-ratelimit-currency"), Some("USD"));
    assert_eq!(first.header("x-ratelimit-limit-cost"), Some("0.015"));
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("100000"));
    svc.await_remaining("user", "bob", 7_500);
    assert_eq!(ask("bob", "gpt-4o").status, 200);
    svc.await_remaining("user", "bob", 0);
    let denied = ask("bob", "gpt-4o");
    assert_eq!(denied.status, 429, "{}", denied.text());
    assert_eq!(
        denied.json()["error"]["message"],
        "Monthly budget of 0.015 USD for bob reached; resets 2026-12-01T00:00:00+08:00."
    );
    assert_eq!(denied.header("x-ratelimit-remaining-cost"), Some("0.00"));
    // A spent budget is OpenAI's insufficient_quota (which its SDKs do not retry).
    assert_eq!(denied.json()["error"]["code"], "insufficient_quota");
    // The team's budget pays for two more, whoever spends it, then nobody in the team.
    svc.await_remaining("team", "team-a", 15_000);
    assert_eq!(ask("carol", "gpt-4o").status, 200);
    svc.await_remaining("team", "team-a", 7_500);
    assert_eq!(ask("carol", "gpt-4o").status, 200);
    svc.await_remaining("team", "team-a", 0);
    let denied = ask("dave", "gpt-4o");
    assert_eq!(denied.status, 429);
    assert_eq!(
        denied.json()["error"]["message"],
        "Monthly budget of 0.03 USD for team-a reached; resets 2026-12-01T00:00:00+08:00."
    );
    assert_eq!(
        up.requests().len(),
        4,
        "four requests paid for, four served"
    );
    // The service shows the spend in currency, and counts it per limit.
    let quota = http::send(
        svc.port,
        "GET",
        "/v1/quota?limit=team&value=team-a",
        &[],
        b"",
    )
    .json();
    assert_eq!(quota["meters"][0]["currency"], "USD");
    assert_eq!(quota["meters"][0]["tokens"], 30_000);
    assert_eq!(quota["meters"][0]["budget_amount"], "0.03");
    assert_eq!(quota["meters"][0]["spent_amount"], "0.03");
    assert_eq!(quota["meters"][0]["remaining_amount"], "0.00");
    let metrics = http::send(svc.port, "GET", "/metrics", &[], b"").text();
    let series = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{limit=\"team\",currency=\"USD\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse().unwrap())
    };
    assert_eq!(
        series("ratelimit_spend_micros_total") - series("ratelimit_spend_refunded_micros_total"),
        30_000
    );

    // December in Shanghai: every budget is whole again.
    let moved = http::send(svc.port, "POST", "/v1/clock?advance_ms=3600000", &[], b"");
    assert_eq!(moved.status, 200, "{}", moved.text());
    let december = ask("bob", "gpt-4o");
    assert_eq!(december.status, 200, "{}", december.text());
    svc.await_remaining("team", "team-a", 22_500);
    svc.await_remaining("user", "bob", 7_500);
}

#[test]
fn a_model_without_a_price_is_refused_under_a_budget_in_money() {
    let svc = Service::start(&[], &[]);
    let up = upstream();
    let e = Envoy::start(
        &config(),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |body: &[u8]| {
        http::send(
            e.port,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-team", "t"),
                ("x-user", "u"),
            ],
            body,
        )
    };
    for body in [
        &br#"{"model": "llama-3-70b"}"#[..],
        br#"{"messages": []}"#,
        // A body the plugin cannot read has no model it can price.
        b"{not json",
    ] {
        let r = ask(body);
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "model_not_priced");
    }
    assert_eq!(
        up.requests().len(),
        0,
        "nothing unpriced reached the upstream"
    );
    assert_eq!(e.metric("requests_unpriced"), 3);
    assert_eq!(ask(br#"{"model": "gpt-4o"}"#).status, 200);
}

/// An answer billed at a service tier costs the tier's multiple of its price: OpenAI's
/// `service_tier: "priority"` at 2× with `prices.service_tiers`.
#[test]
fn a_service_tier_multiplies_the_price() {
    let svc = Service::start(&[], &[]);
    let up = Server::start(|req| {
        let tier = req.json()["service_tier"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        // Gemini's API names the tier it served in a header, Vertex AI in `trafficType`.
        if req.path.contains(":generateContent") {
            let usage = json!({"promptTokenCount": 1000, "candidatesTokenCount": 500,
                               "totalTokenCount": 1500});
            let mut body = json!({"candidates": [], "modelVersion": "gemini-2.5-flash",
                                  "usageMetadata": usage});
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            match tier.as_str() {
                "gemini-priority" => {
                    headers.push(("x-gemini-service-tier".into(), "priority".into()))
                }
                "vertex-flex" => body["usageMetadata"]["trafficType"] = json!("ON_DEMAND_FLEX"),
                _ => {}
            }
            return Behaviour::Reply(Response {
                status: 200,
                headers,
                body: body.to_string().into_bytes(),
            });
        }
        json_reply(
            200,
            json!({"id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "service_tier": tier, "choices": [],
                   "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}),
        )
    });
    let mut c = config();
    c["prices"]["service_tiers"] = json!({"priority": "2", "flex": "0.5"});
    c["prices"]["models"]
        .as_array_mut()
        .unwrap()
        .push(json!({"model": "gemini-2.5-flash", "input": "2.50", "output": "10.00"}));
    let e = Envoy::start(
        &c,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |user: &str, tier: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-team", "team-t"), ("x-user", user)],
            &json!({"model": "gpt-4o", "service_tier": tier}),
        )
        .status
    };
    // 0.0075 USD at the default tier: 0.015 at priority, 0.00375 at flex.
    assert_eq!(ask("pri", "priority"), 200);
    svc.await_remaining("user", "pri", 0);
    assert_eq!(ask("flx", "flex"), 200);
    svc.await_remaining("user", "flx", 15_000 - 3_750);
    let gemini = |user: &str, tier: &str| {
        http::post_json(
            e.port,
            "/v1beta/models/gemini-2.5-flash:generateContent",
            &[("x-team", "team-g"), ("x-user", user)],
            &json!({"contents": [], "service_tier": tier}),
        )
        .status
    };
    assert_eq!(gemini("gpri", "gemini-priority"), 200);
    svc.await_remaining("user", "gpri", 0);
    assert_eq!(gemini("vflx", "vertex-flex"), 200);
    svc.await_remaining("user", "vflx", 15_000 - 3_750);
    assert_eq!(gemini("gstd", "standard"), 200);
    svc.await_remaining("user", "gstd", 15_000 - 7_500);
}
