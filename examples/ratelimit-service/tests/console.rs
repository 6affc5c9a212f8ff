//! The console's endpoints and the admin API over HTTP, against the memory store and a real
//! Redis: who spends is ranked, denials are kept, a grant or a reset changes what the next
//! check answers, and nothing acts without the admin token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::{json, Value};
use testkit::http::{self, send};
use testkit::redis::RedisServer;
use testkit::service::Service;

const TOKEN: &str = "s3cret-admin-token-for-tests";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ratelimit-service"))
}

fn d(user: &str) -> Value {
    json!({"limit": "per-user", "value": user, "rates": [{"tokens": 100, "window_s": 3600}]})
}

fn check(s: &Service, user: &str, reserve: u64) -> Value {
    http::post_json(
        s.port,
        "/v1/check",
        &[],
        &json!({"descriptors": [d(user)], "reserve": reserve}),
    )
    .json()
}

fn report(s: &Service, seq: u64, user: &str, tokens: u64) {
    let r = http::post_json(
        s.port,
        "/v1/report",
        &[],
        &json!({"reports": [{"id": format!("00000000000000c0-{seq}"), "descriptors": [d(user)], "tokens": tokens,
                              "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}}]}),
    );
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());
}

fn admin(s: &Service, path: &str, token: Option<&str>, body: &Value) -> http::Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    send(s.port, "POST", path, &headers, body.to_string().as_bytes())
}

/// The entry of `limit` in a `/v1/console/top` answer.
fn limit_in(top: &Value, limit: &str) -> Value {
    top["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limit"] == limit)
        .unwrap_or_else(|| panic!("no {limit} in {top}"))
        .clone()
}

/// Polls `path` until `ready` holds for its JSON (the Redis store writes the console's data in
/// the background), failing after 10 s with what it last said.
fn eventually(s: &Service, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = send(s.port, "GET", path, &[], b"").json();
        if ready(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{path}: {v}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn scenario(s: &Service) {
    report(s, 1, "alice", 90);
    report(s, 2, "bob", 10);
    report(s, 3, "alice", 5);
    // Ranked by the tokens they used, with their meters now.
    let top = eventually(s, "/v1/console/top", |v| {
        v["limits"][0]["top"][0]["tokens"] == 95 && v["limits"][0]["top"][1]["tokens"] == 10
    });
    let per_user = limit_in(&top, "per-user");
    assert_eq!(per_user["top"][0]["value"], "alice");
    assert_eq!(per_user["top"][0]["tokens"], 95);
    assert_eq!(per_user["top"][0]["meters"][0]["remaining"], 5);
    assert_eq!(per_user["top"][1]["value"], "bob");
    // A denial is kept with its reason.
    assert_eq!(check(s, "alice", 10)["allowed"], false);
    let denials = eventually(s, "/v1/console/denials", |v| v["denials"][0].is_object());
    let last = &denials["denials"][0];
    assert_eq!(
        (last["limit"].as_str(), last["value"].as_str()),
        (Some("per-user"), Some("alice"))
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("5 tokens left of 100"),
        "{last}"
    );
    // The timeline counts the tokens of this minute.
    let overview = eventually(s, "/v1/console/overview", |v| {
        v["timeline"][14]["tokens"] == 105
    });
    assert_eq!(overview["timeline"].as_array().unwrap().len(), 15);
    assert_eq!(overview["timeline"][14]["tokens"], 105);
    assert!(overview["counters"]["checks_denied"].as_u64().unwrap() >= 1);
    // Search finds every meter of a value.
    let found = send(s.port, "GET", "/v1/console/search?value=bob", &[], b"").json();
    assert_eq!(found["counters"][0]["limit"], "per-user");
    assert_eq!(found["counters"][0]["meters"][0]["remaining"], 90);

    // Without a valid token, nothing changes.
    let grant = json!({"limit": "per-user", "value": "alice", "amount": 50});
    assert_eq!(admin(s, "/v1/admin/grant", None, &grant).status, 401);
    assert_eq!(
        admin(
            s,
            "/v1/admin/grant",
            Some("wrong-token-wrong-token"),
            &grant
        )
        .status,
        401
    );
    assert_eq!(check(s, "alice", 10)["allowed"], false);
    // A grant lets this window admit that much more.
    let r = admin(s, "/v1/admin/grant", Some(TOKEN), &grant);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["meters_changed"], 1);
    assert_eq!(check(s, "alice", 10)["allowed"], true);
    // A reset gives the whole budget back.
    let r = admin(
        s,
        "/v1/admin/reset",
        Some(TOKEN),
        &json!({"limit": "per-user", "value": "bob"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(check(s, "bob", 0)["limits"][0]["remaining"], 100);
    assert_eq!(
        admin(
            s,
            "/v1/admin/grant",
            Some(TOKEN),
            &json!({"limit": "per-user", "value": "bob"})
        )
        .status,
        400,
        "a grant needs an amount"
    );
    let metrics = send(s.port, "GET", "/metrics", &[], b"").text();
    for line in [
        "ratelimit_admin_actions_total{action=\"grant\"} 1",
        "ratelimit_admin_actions_total{action=\"reset\"} 1",
        "ratelimit_admin_actions_total{action=\"unauthorized\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(s.log().contains("admin grant"), "{}", s.log());
    shared_pools(s);
}

/// A shared pool (every value a `shared` rule matches spends the rule's pattern) and a client
/// whose own value is that pattern text rank apart, and the top list says which is shared, so
/// a grant or a reset from it changes the counter it shows.
fn shared_pools(s: &Service) {
    let pool = |shared: bool| json!({"limit": "per-ip", "value": "10.0.0.0/8", "shared": shared, "rates": [{"tokens": 100, "window_s": 3600}]});
    for (seq, shared, tokens) in [(10, true, 80), (11, false, 30)] {
        let r = http::post_json(
            s.port,
            "/v1/report",
            &[],
            &json!({"reports": [{"id": format!("00000000000000c0-{seq}"), "descriptors": [pool(shared)], "tokens": tokens}]}),
        );
        assert_eq!(r.json()["accepted"], 1, "{}", r.text());
    }
    let top = eventually(s, "/v1/console/top", |v| {
        v["limits"].as_array().is_some_and(|ls| {
            ls.iter()
                .any(|l| l["limit"] == "per-ip" && l["top"][1].is_object())
        })
    });
    let per_ip = limit_in(&top, "per-ip");
    let (first, second) = (&per_ip["top"][0], &per_ip["top"][1]);
    assert_eq!(
        (
            first["value"].as_str(),
            first["shared"].as_bool(),
            first["tokens"].as_u64()
        ),
        (Some("10.0.0.0/8"), Some(true), Some(80))
    );
    assert_eq!(first["meters"][0]["remaining"], 20, "the pool's own meter");
    assert_eq!(
        (
            second["shared"].as_bool(),
            second["meters"][0]["remaining"].as_u64()
        ),
        (Some(false), Some(70))
    );
    // A reset of the pool, as the console sends it, gives the pool its budget back, and only it.
    let r = admin(
        s,
        "/v1/admin/reset",
        Some(TOKEN),
        &json!({"limit": "per-ip", "value": "10.0.0.0/8", "shared": first["shared"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let remaining = |shared: bool| {
        http::post_json(
            s.port,
            "/v1/check",
            &[],
            &json!({"descriptors": [pool(shared)]}),
        )
        .json()["limits"][0]["remaining"]
            .as_u64()
    };
    assert_eq!((remaining(true), remaining(false)), (Some(100), Some(70)));
}

#[test]
fn console_and_admin_api_on_the_memory_store() {
    let s = Service::start_binary(bin(), &["--admin-token", TOKEN], &[]);
    scenario(&s);
}

#[test]
fn console_and_admin_api_on_redis_shared_by_replicas() {
    let redis = RedisServer::start();
    let url = redis.url();
    let s = Service::start_binary(bin(), &["--redis-url", &url, "--admin-token", TOKEN], &[]);
    scenario(&s);
    // Another replica sees the same ranking and denials.
    let other = Service::start_binary(bin(), &["--redis-url", &url], &[]);
    let top = send(other.port, "GET", "/v1/console/top", &[], b"").json();
    let per_user = limit_in(&top, "per-user");
    assert_eq!(per_user["top"][0]["value"], "alice");
    let denials = send(other.port, "GET", "/v1/console/denials", &[], b"").json();
    assert_eq!(denials["denials"][0]["value"], "alice");
    // Without a token the admin API is not there at all.
    let r = admin(
        &other,
        "/v1/admin/reset",
        Some(TOKEN),
        &json!({"limit": "per-user", "value": "alice"}),
    );
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn the_console_page_is_served_whole_and_needs_nothing_from_elsewhere() {
    let s = Service::start_binary(bin(), &[], &[]);
    let page = send(s.port, "GET", "/console", &[], b"");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    for needed in [
        "/v1/console/overview",
        "/v1/console/top",
        "/v1/console/denials",
        "textContent",
    ] {
        assert!(html.contains(needed), "{needed}");
    }
    // No CDN, no external script, font or stylesheet.
    assert!(
        !html.contains("http://")
            || html
                .matches("http://")
                .all(|_| html.contains("http://www.w3.org/2000/svg"))
    );
    assert!(!html.contains("https://"));
    assert!(
        !html.contains("innerHTML"),
        "client-controlled key values must never be parsed as HTML"
    );
    let (status, out) = testkit::service::run(bin(), &["--admin-token", "short"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        out.contains("--admin-token must be at least 16 characters"),
        "{out}"
    );
}

/// The top list looks up at most 100 counters per page, however many limits and keys there are:
/// the rest are listed with their counts and no meters.
#[test]
fn the_top_list_is_bounded() {
    let s = Service::start_binary(bin(), &[], &[]);
    let mut reports = Vec::new();
    for l in 0..30 {
        for k in 0..5 {
            reports.push(json!({"id": format!("00000000000000d0-{}", l * 5 + k + 1),
                "descriptors": [{"limit": format!("limit-{l:02}"), "value": format!("key-{k}"), "rates": [{"tokens": 100, "window_s": 3600}]}],
                "tokens": 1 + k}));
        }
    }
    for batch in reports.chunks(50) {
        let r = http::post_json(s.port, "/v1/report", &[], &json!({"reports": batch}));
        assert_eq!(r.json()["accepted"], 50, "{}", r.text());
    }
    let top = send(s.port, "GET", "/v1/console/top?k=5", &[], b"").json();
    let keys: Vec<&Value> = top["limits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["top"].as_array().unwrap())
        .collect();
    assert_eq!(keys.len(), 150);
    let looked_up = keys
        .iter()
        .filter(|k| !k["meters"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(looked_up, ratelimit_service::console::MAX_RANKING_LOOKUPS);
}
