//! Reservations that cannot be gamed, in a real Envoy against the real rate-limit service:
//! output caps clamped whatever the body says, a check refused as malformed never admitted, a
//! late refund settled in the window that held its reservation (memory and Redis; sliding and
//! fixed windows), and reservations nobody will settle released by id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Behaviour, Server};
use testkit::redis::RedisServer;
use testkit::service::Service;

/// An upstream that reports `x-used` completion tokens, after `x-delay-ms` if given.
fn upstream() -> Server {
    Server::start(|req| {
        let used: u64 = req
            .header("x-used")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let answer = json_reply(
            200,
            json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": used, "total_tokens": used}}),
        );
        match req.header("x-delay-ms").and_then(|v| v.parse().ok()) {
            Some(ms) => Behaviour::Delay(Duration::from_millis(ms), Box::new(answer)),
            None => answer,
        }
    })
}

fn config(budget: u64, window: Value, service: Value) -> Value {
    let mut service_block = json!({"cluster": "ratelimit", "timeout_ms": 5000});
    service_block
        .as_object_mut()
        .unwrap()
        .extend(service.as_object().unwrap().clone());
    json!({
        "service": service_block,
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": budget, "window": window}],
        "reserve": {"tokens": "max_tokens"}
    })
}

fn ask(e: &Envoy, user: &str, used: u64, body: &Value) -> http::Response {
    http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", user), ("x-used", &used.to_string())],
        body,
    )
}

#[test]
fn a_spent_budget_stays_spent_whatever_the_body_says_about_output_caps() {
    let (svc, up) = (Service::start(&[], &[]), upstream());
    let e = Envoy::start(
        &config(1000, json!("1h"), json!({})),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    assert_eq!(
        ask(&e, "mallory", 1000, &json!({"max_tokens": 10})).status,
        200
    );
    svc.await_remaining("user", "mallory", 0);
    let huge = 100_000_000_000_000_000u64;
    let bodies = [
        json!({"max_tokens": 10}),
        json!({"max_tokens": huge}),
        json!({"max_completion_tokens": huge}),
        json!({"max_output_tokens": 1e300}),
        json!({"generationConfig": {"maxOutputTokens": huge}}),
        json!({"max_tokens": u64::MAX}),
        json!({"max_tokens": -5}),
        json!({"max_tokens": 10.5}),
        json!({"max_tokens": "1e30"}),
        json!({"max_tokens": "lots"}),
        json!({"max_tokens": null}),
        json!({"max_tokens": [1]}),
        json!({"max_tokens": {"n": 1}}),
        json!({}),
    ];
    for body in &bodies {
        let r = ask(&e, "mallory", 0, body);
        assert_eq!(r.status, 429, "{body}: {}", r.text());
    }
    // A body far beyond JSON's integer range, as raw text.
    let raw = br#"{"max_tokens": 99999999999999999999999999999999999999}"#;
    let r = http::send(
        e.port,
        "POST",
        "/v1/chat/completions",
        &[("x-user", "mallory"), ("content-type", "application/json")],
        raw,
    );
    assert_eq!(r.status, 429);
    assert_eq!(
        up.requests().len(),
        1,
        "nothing past the budget reached the model"
    );
    for kind in [
        "rejected",
        "status",
        "body",
        "timeout",
        "unavailable",
        "reset",
    ] {
        assert_eq!(e.metric(&format!("check_failures.{kind}")), 0, "{kind}");
    }
    // Another user with a budget can still send a huge cap: it is clamped to the budget.
    let r = ask(&e, "alice", 5, &json!({"max_tokens": huge}));
    assert_eq!(r.status, 200, "{}", r.text());
    svc.await_remaining("user", "alice", 995);
}

#[test]
fn a_check_refused_as_malformed_is_never_admitted() {
    for protocol in ["v1", "asm"] {
        let refusing = Server::start(|req| {
            if req.path.starts_with("/v1/report") || req.path == "/update_ratelimit_record" {
                return json_reply(200, json!({"accepted": 1, "duplicates": 0}));
            }
            json_reply(
                400,
                json!({"error": "descriptors[0]: the contract says no"}),
            )
        });
        let up = upstream();
        let limits = if protocol == "asm" {
            json!([{"name": "user", "key": "{{request.headers.x-user}}"}])
        } else {
            json!([{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 10, "window": "1h"}])
        };
        let e = Envoy::start(
            &json!({
                "service": {"cluster": "ratelimit", "protocol": protocol, "failure_mode": "allow"},
                "limits": limits
            }),
            &[
                cluster("ratelimit", refusing.port),
                cluster("upstream", up.port),
            ],
        );
        let r = ask(&e, "u", 0, &json!({}));
        assert_eq!(r.status, 503, "{protocol}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
        assert_eq!(up.requests().len(), 0, "{protocol}: never admitted");
        assert_eq!(e.metric("check_failures.rejected"), 1);
        assert_eq!(e.metric("failure_mode_allowed"), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !e.log().contains("the contract says no") {
            assert!(
                Instant::now() < deadline,
                "the service's message is logged:\n{}",
                e.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A request reserving the whole budget late in a 4-second window, answered (10 tokens) in
/// the next one; then, late in that next window, 12 concurrent requests of 200. At most 5 fit
/// (refunded into the new window, 9 would with fixed windows and 8 with sliding ones).
fn late_refund(store_args: &[&str], window: &str) {
    let mut args = store_args.to_vec();
    args.extend(["--window", window]);
    let (svc, up) = (Service::start(&args, &[]), upstream());
    let e = Envoy::start(
        &config(1000, json!(4), json!({})),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let user = "late";
    // Wait for 2.7–2.9 s into a window.
    loop {
        let phase = now_ms() % 4000;
        if (2700..2900).contains(&phase) {
            break;
        }
        std::thread::sleep(Duration::from_millis(if phase < 2700 {
            2700 - phase
        } else {
            4000 - phase + 2700
        }));
    }
    let started = now_ms();
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", user), ("x-used", "10"), ("x-delay-ms", "1500")],
        &json!({"max_tokens": 1000}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answered = now_ms();
    assert_ne!(
        started / 4000,
        answered / 4000,
        "the answer lands in the next window"
    );
    // Late in that window, where the previous one (which held the reservation) weighs little.
    std::thread::sleep(Duration::from_millis(2900 - answered % 4000));
    let admitted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    http::post_json(
                        e.port,
                        "/v1/chat/completions",
                        &[("x-user", user), ("x-used", "200")],
                        &json!({"max_tokens": 200}),
                    )
                    .status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|s| *s == 200)
            .count()
    });
    assert_eq!(now_ms() / 4000, answered / 4000, "still in the same window");
    assert!(
        (4..=5).contains(&admitted),
        "{window} window: {admitted} × 200 tokens admitted on a budget of 1000"
    );
}

#[test]
fn a_late_refund_does_not_enlarge_the_next_window_sliding_memory() {
    late_refund(&[], "sliding");
}

#[test]
fn a_late_refund_does_not_enlarge_the_next_window_fixed_memory() {
    late_refund(&[], "fixed");
}

#[test]
fn a_late_refund_does_not_enlarge_the_next_window_sliding_redis() {
    let redis = RedisServer::start();
    late_refund(
        &["--store", "redis", "--redis-url", &redis.url()],
        "sliding",
    );
}

#[test]
fn a_late_refund_does_not_enlarge_the_next_window_fixed_redis() {
    let redis = RedisServer::start();
    late_refund(&["--store", "redis", "--redis-url", &redis.url()], "fixed");
}

/// The real service behind a forwarder that holds every check back for `check_delay`.
fn slow_checks(service: u16, check_delay: Duration) -> Server {
    Server::start(move |req| {
        if req.path == "/v1/check" {
            std::thread::sleep(check_delay);
        }
        http::forward(service, req)
    })
}

fn await_traffic(forwarder: &Server) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (checks, reports) = (forwarder.checks(), forwarder.reports());
        if !checks.is_empty() && !reports.is_empty() {
            return reports[0].json();
        }
        assert!(Instant::now() < deadline, "no check and report seen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stream_reset_during_its_check_releases_the_reservation() {
    let (svc, up) = (Service::start(&[], &[]), upstream());
    let forwarder = slow_checks(svc.port, Duration::from_millis(1000));
    let e = Envoy::start(
        &config(1000, json!("1h"), json!({})),
        &[
            cluster("ratelimit", forwarder.port),
            cluster("upstream", up.port),
        ],
    );
    let body = json!({"max_tokens": 500}).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", e.port)).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm.test\r\nx-user: quitter\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(conn);
    let report = await_traffic(&forwarder);
    assert!(report["reports"][0]["release"].is_string(), "{report}");
    assert_eq!(report["reports"][0]["reserved"], 500);
    // Whichever reached the service first, the reservation is gone for good.
    std::thread::sleep(Duration::from_millis(1500));
    svc.await_remaining("user", "quitter", 1000);
    assert_eq!(up.requests().len(), 0);
}

#[test]
fn a_check_given_up_on_is_charged_its_usage_once() {
    let (svc, up) = (Service::start(&[], &[]), upstream());
    let forwarder = slow_checks(svc.port, Duration::from_millis(800));
    let e = Envoy::start(
        &config(1000, json!("1h"), json!({"timeout_ms": 300})),
        &[
            cluster("ratelimit", forwarder.port),
            cluster("upstream", up.port),
        ],
    );
    let r = ask(&e, "patient", 100, &json!({"max_tokens": 500}));
    assert_eq!(r.status, 200, "fails open: {}", r.text());
    assert_eq!(e.metric("check_failures.timeout"), 1);
    let report = await_traffic(&forwarder);
    assert!(report["reports"][0]["release"].is_string(), "{report}");
    std::thread::sleep(Duration::from_millis(1500));
    svc.await_remaining("user", "patient", 900);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(svc.remaining("user", "patient"), Some(900), "and it stays");
}
