//! `service.protocol: "envoy-rls"` in a real Envoy against engines of Envoy's rate-limit gRPC
//! service (`ShouldRateLimit` over h2c, `testkit::rls`): a stand-in that answers as told (allow
//! with quota headers, deny with Retry-After, gRPC errors under both failure modes, reports
//! carrying the right `hits_addend`), and Limitador itself (the `limitador` crate behind the
//! same RPC, answering as `limitador-server` does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_token_ratelimit::rls::{
    DescriptorStatus, Duration as PbDuration, RateLimit, RateLimitRequest, RateLimitResponse,
    CODE_OK, CODE_OVER_LIMIT,
};
use serde_json::json;
use testkit::envoy::{cluster, cluster_h2, Envoy};
use testkit::http;
use testkit::rls::{limitador, limitador_count, Answer, LimitadorLimit, Rls};
use testkit::service::mock_llm;

fn status(code: i32, limit: u32, remaining: u32, reset_s: i64) -> DescriptorStatus {
    DescriptorStatus {
        code,
        current_limit: Some(RateLimit {
            requests_per_unit: limit,
            unit: 2,
            name: String::new(),
        }),
        limit_remaining: remaining,
        duration_until_reset: Some(PbDuration {
            seconds: reset_s,
            nanos: 0,
        }),
    }
}

fn config(failure_mode: &str, reserve: serde_json::Value) -> serde_json::Value {
    json!({
        "service": {"cluster": "ratelimit", "protocol": "envoy-rls", "domain": "llm",
                    "descriptor_entries": {"generic_key": "gateway"},
                    "failure_mode": failure_mode, "timeout_ms": 500},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}"}],
        "reserve": {"tokens": reserve}
    })
}

fn ask(e: &Envoy, user: &str) -> http::Response {
    http::post_json(
        e.port,
        "/v1/chat/completions",
        &[
            ("x-user", user),
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "16"),
        ],
        &json!({"model": "m", "max_tokens": 100}),
    )
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn allowed_checks_carry_quota_and_reports_the_tokens_used() {
    let rls = Rls::start(|_| {
        Answer::Reply(RateLimitResponse {
            overall_code: CODE_OK,
            statuses: vec![status(CODE_OK, 1000, 900, 30)],
            ..Default::default()
        })
    });
    let llm = mock_llm();
    let e = Envoy::start(
        &config("deny", json!(0)),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    let r = ask(&e, "alice");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("900"));
    assert_eq!(r.header("x-ratelimit-reset-tokens"), Some("30s"));
    wait_for("the report", || rls.seen().len() == 2);
    let seen = rls.seen();
    let entries = |m: &RateLimitRequest| -> Vec<(String, String)> {
        m.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    };
    for m in &seen {
        assert_eq!(m.domain, "llm");
        assert_eq!(
            entries(m),
            [
                ("generic_key".into(), "gateway".into()),
                ("user".into(), "alice".into())
            ]
        );
    }
    // The check adds 1 (the API's minimum); the report the rest of the 26 tokens.
    assert_eq!(seen[0].hits_addend, 1);
    assert_eq!(seen[1].hits_addend, 25);
    wait_for("the report counted", || e.metric("reports.sent") == 1);
    assert_eq!(e.metric("tokens_reported"), 26);
}

/// `service.api_key` under envoy-rls: the `authorization` entry of each call's gRPC metadata.
#[test]
fn the_api_key_travels_as_grpc_metadata() {
    let rls = Rls::start(|_| {
        Answer::Reply(RateLimitResponse {
            overall_code: CODE_OK,
            statuses: vec![status(CODE_OK, 1000, 900, 60)],
            ..Default::default()
        })
    });
    let llm = mock_llm();
    let mut c = config("deny", json!(0));
    c["service"]["api_key"] = json!("rls-key-0123456789");
    let e = Envoy::start(
        &c,
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(&e, "ann").status, 200);
    wait_for("the report", || rls.seen().len() >= 2);
    let auth = rls.authorizations();
    assert!(auth.len() >= 2);
    assert!(auth
        .iter()
        .all(|a| a.as_deref() == Some("Bearer rls-key-0123456789")));
}

#[test]
fn over_limit_denies_with_retry_after() {
    let rls = Rls::start(|_| {
        Answer::Reply(RateLimitResponse {
            overall_code: CODE_OVER_LIMIT,
            statuses: vec![status(CODE_OVER_LIMIT, 1000, 0, 42)],
            ..Default::default()
        })
    });
    let llm = mock_llm();
    let e = Envoy::start(
        &config("allow", json!("max_tokens")),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    let r = ask(&e, "bob");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("42"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    // The reservation is the request's max_tokens; a denied request reports nothing.
    std::thread::sleep(Duration::from_millis(300));
    let seen = rls.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].hits_addend, 100);
    // envoyproxy/ratelimit counts a denied check's hits: one request asking for 10^12 tokens
    // must not spend a shared counter's window. `reserve.max` is 4,096 under envoy-rls.
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "bob")],
        &json!({"model": "m", "max_tokens": 1e12}),
    );
    assert_eq!(r.status, 429);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rls.seen()[1].hits_addend, 4096);
}

#[test]
fn grpc_errors_follow_the_failure_mode() {
    let rls = Rls::start(|m| {
        let user = &m.descriptors[0].entries[1].value;
        Answer::Error(if user == "internal" { 13 } else { 14 })
    });
    let llm = mock_llm();
    for (mode, want) in [("allow", 200), ("deny", 503)] {
        let e = Envoy::start(
            &config(mode, json!(0)),
            &[
                cluster_h2("ratelimit", rls.port),
                cluster("upstream", llm.port),
            ],
        );
        assert_eq!(ask(&e, "unavailable").status, want, "{mode}");
        assert_eq!(ask(&e, "internal").status, want, "{mode}");
        assert_eq!(e.metric("check_failures.unavailable"), 1, "{mode}");
        assert_eq!(e.metric("check_failures.status"), 1, "{mode}");
    }
}

#[test]
fn reservations_cover_the_usage_then_nothing_more_is_reported() {
    let rls = Rls::start(|_| {
        Answer::Reply(RateLimitResponse {
            overall_code: CODE_OK,
            statuses: vec![],
            ..Default::default()
        })
    });
    let llm = mock_llm();
    let e = Envoy::start(
        &config("deny", json!("max_tokens")),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(&e, "carol").status, 200);
    // 100 reserved at the check, 26 used: the RLS API cannot refund, so no report call.
    wait_for("settled", || e.metric("reports.sent") == 1);
    let seen = rls.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].hits_addend, 100);
}

/// An engine that refuses a hit past the limit (as Limitador does) but says in `statuses`
/// what remains (which Limitador does not; see the Limitador tests below). A limit of 100
/// tokens per user, answers of 30 tokens (1 reserved at the check, 29 reported): four
/// requests are served, the fourth's report is refused, the plugin sends what the status says
/// still fits (9), and the fifth is denied.
#[test]
fn reports_past_a_limit_an_engine_refuses_still_spend_the_budget() {
    let counters = Arc::new(Mutex::new(std::collections::HashMap::<String, u32>::new()));
    let state = counters.clone();
    let rls = Rls::start(move |m| {
        let user = m.descriptors[0]
            .entries
            .iter()
            .find(|e| e.key == "user")
            .map(|e| e.value.clone())
            .unwrap_or_default();
        let mut all = state.lock().unwrap();
        let used = all.entry(user).or_insert(0);
        let hits = m.hits_addend.max(1);
        let (code, remaining) = if *used + hits > 100 {
            (CODE_OVER_LIMIT, 100 - *used)
        } else {
            *used += hits;
            (CODE_OK, 100 - *used)
        };
        Answer::Reply(RateLimitResponse {
            overall_code: code,
            statuses: vec![status(code, 100, remaining, 3600)],
            ..Default::default()
        })
    });
    let llm = mock_llm();
    let e = Envoy::start(
        &config("deny", json!(0)),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    assert!(
        e.log().contains("tokens_over_limit"),
        "the plugin warns at load"
    );
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "carol"),
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-completion-tokens", "20"),
            ],
            &json!({"model": "m"}),
        )
        .status
    };
    let used = || counters.lock().unwrap().get("carol").copied().unwrap_or(0);
    for (n, want) in [(1, 30), (2, 60), (3, 90)] {
        assert_eq!(ask(), 200, "request {n}");
        wait_for("the report counted", || used() == want);
    }
    assert_eq!(ask(), 200, "91 of 100 used: admitted");
    wait_for("what still fits is counted", || used() == 100);
    assert_eq!(ask(), 429, "the budget is spent");
    wait_for("the over-limit tokens counted", || {
        e.metric("tokens_over_limit") == 20
    });
}

/// Limitador's configuration for these tests: 100 tokens an hour for each user.
const USER_100_AN_HOUR: [LimitadorLimit<'static>; 1] = [LimitadorLimit {
    key: "user",
    max: 100,
    seconds: 3600,
}];

/// The plugin against Limitador (memory storage, as `limitador-server` answers: OVER_LIMIT
/// with no statuses, a refused call counts nothing): the limit declares Limitador's window,
/// as the engine dates nothing.
fn limitador_config(reserve: serde_json::Value) -> serde_json::Value {
    json!({
        "service": {"cluster": "ratelimit", "protocol": "envoy-rls", "domain": "llm",
                    "failure_mode": "deny", "timeout_ms": 1000},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "window": "1h"}],
        "reserve": {"tokens": reserve}
    })
}

/// A chat completion that uses 30 tokens (10 prompt, 20 completion) and asks for at most 30.
fn ask_30(port: u16, user: &str) -> http::Response {
    http::post_json(
        port,
        "/v1/chat/completions",
        &[
            ("x-user", user),
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "20"),
        ],
        &json!({"model": "m", "max_tokens": 30}),
    )
}

/// The acceptance of a 100-token budget against the real engine: with 30-token answers at
/// most 4 requests are served (before, 13 were: Limitador says nothing of what remains, so
/// each report crossing the limit was dropped and checks of one hit kept admitting). The
/// plugin halves the refused report toward what fits, so the counter ends at exactly 100;
/// the denial's retry is the declared window, not 1 s.
#[test]
fn limitador_a_100_token_budget_serves_at_most_four_30_token_answers() {
    let (rls, engine) = limitador("llm", &USER_100_AN_HOUR, false);
    let llm = mock_llm();
    let e = Envoy::start(
        &limitador_config(json!(0)),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    let counted = || limitador_count(&engine, "llm", "user", "carol");
    let mut served = 0;
    let denied = loop {
        let r = ask_30(e.port, "carol");
        if r.status != 200 {
            break r;
        }
        served += 1;
        assert!(served <= 4, "a fifth request was served");
        let want = (served * 30).min(100);
        wait_for("the report counted", || counted() == want);
    };
    assert_eq!(served, 4);
    assert_eq!(counted(), 100, "the counter ends at its limit");
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("retry-after"), Some("3600"));
    // The fourth answer's 30 tokens: 9 fitted, 20 could not be recorded (1 was the check's).
    wait_for("the uncounted tokens", || {
        e.metric("tokens_over_limit") == 20
    });
    // Limitador's calls: each report, and the fourth one's halving, a few calls, not 20.
    let calls = rls.seen().len();
    assert!(calls <= 5 * 2 + 6, "{calls} calls");
}

/// Eight concurrent requests, then sequential ones: with the answer's cap reserved at the
/// check (`reserve.tokens: "max_tokens"`), Limitador admits what the budget covers and no
/// more, concurrent or not.
#[test]
fn limitador_concurrent_requests_with_reservations_stay_within_the_budget() {
    let (rls, engine) = limitador("llm", &USER_100_AN_HOUR, false);
    let llm = mock_llm();
    let e = Envoy::start(
        &limitador_config(json!("max_tokens")),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    let port = e.port;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let all: Vec<_> = (0..8)
            .map(|_| s.spawn(move || ask_30(port, "dave").status))
            .collect();
        all.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(served <= 4, "{statuses:?}");
    assert_eq!(
        served, 3,
        "three reservations of 30 fit in 100: {statuses:?}"
    );
    wait_for("settled", || {
        limitador_count(&engine, "llm", "user", "dave") == 90
    });
    for _ in 0..3 {
        assert_eq!(ask_30(port, "dave").status, 429);
    }
    assert!(limitador_count(&engine, "llm", "user", "dave") <= 100);
}

/// Limitador run with `--rate-limit-headers DRAFT_VERSION_03`: its `X-RateLimit-*` are the
/// only figures it gives, and the plugin turns them into the quota headers of admitted
/// responses and the retry of a denial.
#[test]
fn limitador_rate_limit_headers_become_quota_headers() {
    let (rls, engine) = limitador("llm", &USER_100_AN_HOUR, true);
    let llm = mock_llm();
    let e = Envoy::start(
        &limitador_config(json!(0)),
        &[
            cluster_h2("ratelimit", rls.port),
            cluster("upstream", llm.port),
        ],
    );
    let first = ask_30(e.port, "erin");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("99"));
    wait_for("the report counted", || {
        limitador_count(&engine, "llm", "user", "erin") == 30
    });
    for n in 2..=4 {
        assert_eq!(ask_30(e.port, "erin").status, 200, "request {n}");
        wait_for("the report counted", || {
            limitador_count(&engine, "llm", "user", "erin") == (n * 30).min(100)
        });
    }
    let denied = ask_30(e.port, "erin");
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("x-ratelimit-remaining-tokens"), Some("0"));
    let retry: u64 = denied.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (3500..=3600).contains(&retry),
        "the counter's own reset: {retry}"
    );
}
