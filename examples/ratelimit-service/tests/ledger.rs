//! The spend ledger against a real PostgreSQL: reports land once whatever is resent or sent
//! at once, `/v1/spend` reads them back as JSON and CSV behind the API key, and a database
//! that goes away for a while loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::http::{self, send};
use testkit::postgres::PostgresServer;
use testkit::service::Service;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ratelimit-service"))
}

fn team(value: &str) -> Value {
    json!({"limit": "team", "value": value, "currency": "USD",
           "rates": [{"tokens": 500_000_000u64, "window_s": 2_678_400,
                      "calendar": {"period": "month", "timezone": "UTC"}}]})
}

fn user(value: &str) -> Value {
    json!({"limit": "user", "value": value, "rates": [{"tokens": 1_000_000, "window_s": 3600}]})
}

/// A report of one request of `tokens` tokens costing `micros`, on model `model`.
fn report(id: u64, team_name: &str, who: &str, model: &str, tokens: u64, micros: u64) -> Value {
    json!({"id": format!("00000000000000aa-{id}"), "descriptors": [team(team_name), user(who)],
           "tokens": tokens, "cost": micros,
           "spend": [{"model": model, "requests": 1, "tokens": tokens, "cost": micros}]})
}

fn post_reports(s: &Service, key: Option<&str>, reports: &[Value]) -> Value {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let r = http::post_json(s.port, "/v1/report", &headers, &json!({"reports": reports}));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn spend(s: &Service, query: &str, key: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    send(
        s.port,
        "GET",
        &format!("/v1/spend?{query}"),
        &[("authorization", &auth)],
        b"",
    )
}

/// The totals row of currency `currency` in a JSON spend report.
fn total(body: &Value, currency: &str) -> Value {
    body["totals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["currency"] == currency)
        .cloned()
        .unwrap_or(Value::Null)
}

const KEY: &str = "ledger-test-key-0123456789";

#[test]
fn reports_count_once_and_read_back_by_team_user_and_model() {
    let pg = PostgresServer::start();
    let s = Service::start_binary(
        bin(),
        &[
            "--ledger",
            &pg.url(),
            "--api-key",
            KEY,
            "--manual-clock",
            "2026-12-10T12:00:00Z",
        ],
        &[],
    );
    let mut reports = Vec::new();
    for i in 0..20u64 {
        let model = if i % 2 == 0 {
            "gpt-4o"
        } else {
            "claude-sonnet"
        };
        reports.push(report(
            i + 1,
            "red",
            &format!("u{}", i % 4),
            model,
            100,
            1_500,
        ));
    }
    let r = post_reports(&s, Some(KEY), &reports);
    assert_eq!(r["accepted"], 20);
    // A resend, and the same reports from 8 clients at once: the store knows them already.
    let r = post_reports(&s, Some(KEY), &reports[..5]);
    assert_eq!(r["duplicates"], 5);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| post_reports(&s, Some(KEY), &reports));
        }
    });

    let body = spend(&s, "group_by=limit,value,model", KEY).json();
    let usd = total(&body, "USD");
    // Only the money limit carries cost; both limits count tokens and requests.
    assert_eq!(
        (
            usd["requests"].clone(),
            usd["tokens"].clone(),
            usd["cost"].clone()
        ),
        (json!(20), json!(2_000), json!("0.03"))
    );
    assert_eq!(total(&body, "")["tokens"], 2_000);
    let rows = body["rows"].as_array().unwrap();
    let red_gpt = rows
        .iter()
        .find(|r| r["limit"] == "team" && r["value"] == "red" && r["model"] == "gpt-4o")
        .unwrap();
    assert_eq!(
        (red_gpt["requests"].clone(), red_gpt["cost_micros"].clone()),
        (json!(10), json!(15_000))
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r["limit"] == "user" && r["value"] == "u1")
            .map(|r| r["tokens"].as_i64().unwrap())
            .sum::<i64>(),
        500
    );

    // Grouped by model alone, as CSV.
    let auth = format!("Bearer {KEY}");
    let csv = send(
        s.port,
        "GET",
        "/v1/spend?group_by=model&from=2026-12-01&to=2027-01-01",
        &[("authorization", &auth), ("accept", "text/csv")],
        b"",
    );
    assert_eq!(csv.status, 200);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let text = csv.text();
    assert!(
        text.starts_with("model,currency,requests,tokens,cost\r\n"),
        "{text}"
    );
    assert!(
        text.contains("\"gpt-4o\",\"USD\",10,1000,0.015\r\n"),
        "{text}"
    );
    // Another month has nothing.
    let november = spend(&s, "from=2026-11-01&to=2026-12-01", KEY).json();
    assert_eq!(november["rows"], json!([]));

    // Behind the API key; bad ranges and groups are refused with the reason.
    assert_eq!(
        send(s.port, "GET", "/v1/spend", &[], b"").status,
        401,
        "no key"
    );
    let bad = spend(&s, "group_by=user", KEY);
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("group_by"), "{}", bad.text());
    assert_eq!(spend(&s, "from=soon", KEY).status, 400);

    // The database holds each report id once.
    assert_eq!(
        pg.sql("SELECT count(*) FROM ltr_ledger_ids")
            .unwrap()
            .trim(),
        "20"
    );
}

/// A memory store forgets which reports it applied when the service restarts: a report
/// resent then is charged again by the store, but the ledger, which keeps ids, counts it once.
#[test]
fn a_resend_the_store_forgot_counts_once_in_the_ledger() {
    let pg = PostgresServer::start();
    let args = ["--ledger", &pg.url(), "--api-key", KEY];
    let mut s = Service::start_binary(bin(), &args, &[]);
    let batch: Vec<Value> = (1..=3)
        .map(|i| report(i, "blue", "ann", "gpt-4o", 10, 100))
        .collect();
    assert_eq!(post_reports(&s, Some(KEY), &batch)["accepted"], 3);
    // Written before a graceful stop.
    s.terminate();
    let s = Service::start_binary(bin(), &args, &[]);
    assert_eq!(
        post_reports(&s, Some(KEY), &batch)["accepted"],
        3,
        "the new process's store has never seen them"
    );
    let body = spend(&s, "group_by=value", KEY).json();
    assert_eq!(total(&body, "USD")["requests"], 3);
    assert_eq!(total(&body, "USD")["tokens"], 30);
    let metrics = send(s.port, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("ratelimit_ledger_entries_total{outcome=\"duplicate\"} 3"),
        "{metrics}"
    );
}

/// The database goes down: reports are still applied (the ledger is off their path), spend
/// reports answer 503, and once it is back every entry is written.
#[test]
fn the_database_down_for_a_while_loses_no_spend() {
    let mut pg = PostgresServer::start();
    let s = Service::start_binary(bin(), &["--ledger", &pg.url(), "--api-key", KEY], &[]);
    let before: Vec<Value> = (1..=50)
        .map(|i| report(i, "green", "bob", "gpt-4o", 7, 70))
        .collect();
    post_reports(&s, Some(KEY), &before);
    assert_eq!(total(&spend(&s, "", KEY).json(), "USD")["requests"], 50);

    pg.kill();
    let during: Vec<Value> = (51..=150)
        .map(|i| report(i, "green", "bob", "claude-sonnet", 7, 70))
        .collect();
    for chunk in during.chunks(10) {
        assert_eq!(
            post_reports(&s, Some(KEY), chunk)["accepted"],
            10,
            "reports do not wait for the ledger"
        );
    }
    let down = spend(&s, "", KEY);
    assert_eq!(down.status, 503, "{}", down.text());
    let metrics = send(s.port, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("ratelimit_ledger_waiting 100"),
        "{metrics}"
    );

    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = spend(&s, "group_by=model", KEY);
        if r.status == 200 {
            let body = r.json();
            assert_eq!(total(&body, "USD")["requests"], 150);
            assert_eq!(total(&body, "USD")["tokens"], 1_050);
            assert_eq!(total(&body, "USD")["cost_micros"], 10_500);
            break;
        }
        assert!(Instant::now() < deadline, "the ledger never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Without `--ledger` there is nothing to read, and the service says how to get it.
#[test]
fn without_a_ledger_spend_is_not_found() {
    let s = Service::start_binary(bin(), &[], &[]);
    let r = send(s.port, "GET", "/v1/spend", &[], b"");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("--ledger"), "{}", r.text());
}

/// A check of team `red`'s monthly budget (nothing reserved): whether it is admitted.
fn admitted(s: &Service, team_name: &str) -> bool {
    let auth = format!("Bearer {KEY}");
    let r = http::post_json(
        s.port,
        "/v1/check",
        &[("authorization", &auth)],
        &json!({"descriptors": [team(team_name)], "reserve": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["allowed"].as_bool().unwrap()
}

/// `count` reports of 10.00 each for team `red`, ids from `first`.
fn spend_tens(s: &Service, first: u64, count: u64) {
    let reports: Vec<Value> = (first..first + count)
        .map(|i| report(i, "red", "ann", "gpt-4o", 1_000, 10_000_000))
        .collect();
    let r = post_reports(s, Some(KEY), &reports);
    assert_eq!(r["accepted"], count, "{r}");
}

/// A team has spent 480.00 of its 500.00 this month when Redis (no persistence) restarts
/// empty. With the ledger, the month's counter is given its spend back before it is checked
/// again: 20.00 more (reported after the restart) and the team is refused. Without the
/// ledger, the month starts over, as the README warns.
#[test]
fn a_monthly_budget_outlives_a_redis_restart_only_with_the_ledger() {
    for with_ledger in [true, false] {
        let pg = PostgresServer::start();
        let mut redis = testkit::redis::RedisServer::start();
        let url = redis.url();
        let ledger_url = pg.url();
        let mut args = vec![
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--api-key",
            KEY,
            "--manual-clock",
            "2026-12-15T12:00:00Z",
        ];
        if with_ledger {
            args.extend(["--ledger", &ledger_url]);
        }
        let s = Service::start_binary(bin(), &args, &[]);
        assert!(admitted(&s, "red"));
        spend_tens(&s, 1, 48);
        assert!(admitted(&s, "red"), "20.00 left");

        redis.start_again();
        // The service reads Redis's epoch at most once a second.
        std::thread::sleep(Duration::from_millis(1_100));
        spend_tens(&s, 49, 2);
        if with_ledger {
            assert!(!admitted(&s, "red"), "500.00 of 500.00 spent this month");
            let metrics = send(s.port, "GET", "/metrics", &[], b"").text();
            assert!(
                metrics.contains("ratelimit_ledger_restored_total 1"),
                "{metrics}"
            );
            // Another team, new this month: nothing to restore, admitted.
            assert!(admitted(&s, "blue"));
        } else {
            assert!(
                admitted(&s, "red"),
                "without the ledger the month starts over"
            );
            spend_tens(&s, 51, 40);
            assert!(
                admitted(&s, "red"),
                "900.00 spent on a 500.00 budget: the restart handed it out again"
            );
        }
    }
}

/// The memory store loses every counter when the service restarts; with the ledger the month's
/// spend comes back before the first check.
#[test]
fn a_monthly_budget_outlives_a_memory_store_restart_with_the_ledger() {
    let pg = PostgresServer::start();
    let ledger_url = pg.url();
    let args = [
        "--api-key",
        KEY,
        "--manual-clock",
        "2026-12-15T12:00:00Z",
        "--ledger",
        &ledger_url,
    ];
    let mut s = Service::start_binary(bin(), &args, &[]);
    spend_tens(&s, 1, 48);
    s.terminate();
    let s = Service::start_binary(bin(), &args, &[]);
    assert!(admitted(&s, "red"), "20.00 left after the restart");
    spend_tens(&s, 49, 2);
    assert!(!admitted(&s, "red"), "500.00 of 500.00 spent this month");
}

/// Text PostgreSQL cannot store (a NUL byte in a model name a client chose) is stored with
/// the byte replaced, and the ledger goes on writing what follows.
#[test]
fn a_value_postgres_refuses_does_not_stop_the_ledger() {
    let pg = PostgresServer::start();
    let s = Service::start_binary(bin(), &["--ledger", &pg.url(), "--api-key", KEY], &[]);
    let hostile = report(1, "red\u{0}x", "ann\u{0}", "gpt\u{0}4o", 10, 100);
    assert_eq!(post_reports(&s, Some(KEY), &[hostile])["accepted"], 1);
    post_reports(&s, Some(KEY), &[report(2, "red", "ann", "gpt-4o", 10, 100)]);
    let body = spend(&s, "group_by=model", KEY).json();
    assert_eq!(total(&body, "USD")["requests"], 2, "{body}");
    let models: Vec<&str> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert!(models.contains(&"gpt\u{fffd}4o"), "{models:?}");
}
