//! Load and faults through the real stack (Envoy + plugin + service + mock LLM): thousands of
//! requests charged exactly, the service killed and restarted under load, Redis lost under the
//! service, an upstream that resets mid-stream. No request hangs, no report is lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Behaviour, Server};
use testkit::redis::RedisServer;
use testkit::service::{self, mock_llm, Service};

const BUDGET: u64 = 1_000_000_000;

fn config(failure_mode: &str) -> serde_json::Value {
    json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 500, "failure_mode": failure_mode},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"}]
    })
}

fn spent(port: u16, user: &str) -> Option<u64> {
    let q = http::try_send_to(
        &format!("127.0.0.1:{port}"),
        "GET",
        &format!("/v1/quota?limit=user&value={user}"),
        &[],
        b"",
    )
    .ok()?
    .json();
    Some(BUDGET - q["meters"][0]["remaining"].as_u64().unwrap_or(BUDGET))
}

fn await_spent(port: u16, want: &BTreeMap<String, u64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeMap<String, u64> = want
            .keys()
            .map(|u| (u.clone(), spent(port, u).unwrap_or(0)))
            .collect();
        if got == *want {
            return;
        }
        assert!(Instant::now() < deadline, "charged {got:?}, used {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `threads` clients × `each` requests over 20 users, each request using 3 + 4 tokens.
/// Returns the tokens used per user and the statuses seen.
fn load(
    port: u16,
    threads: usize,
    each: usize,
    pause: Duration,
) -> (BTreeMap<String, u64>, BTreeMap<u16, u64>) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut used = BTreeMap::new();
                let mut statuses = BTreeMap::new();
                for i in 0..each {
                    let user = format!("u{}", (t * each + i) % 20);
                    let r = http::post_json(
                        port,
                        "/v1/chat/completions",
                        &[
                            ("x-user", &user),
                            ("x-mock-prompt-tokens", "3"),
                            ("x-mock-completion-tokens", "4"),
                        ],
                        &json!({"model": "m", "messages": []}),
                    );
                    *statuses.entry(r.status).or_insert(0) += 1;
                    if r.status == 200 {
                        *used.entry(user).or_insert(0) += 7;
                    }
                    std::thread::sleep(pause);
                }
                (used, statuses)
            })
        })
        .collect();
    let mut used = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    for h in handles {
        let (u, s) = h.join().unwrap();
        for (k, v) in u {
            *used.entry(k).or_insert(0) += v;
        }
        for (k, v) in s {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    (used, statuses)
}

fn thousands_of_requests_are_charged_exactly(store_args: &[&str]) {
    let (svc, llm) = (Service::start(store_args, &[]), mock_llm());
    let e = Envoy::start(
        &config("deny"),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let (used, statuses) = load(e.port, 24, 100, Duration::ZERO);
    assert_eq!(statuses, BTreeMap::from([(200, 2400)]));
    await_spent(svc.port, &used);
    assert_eq!(e.metric("reports.sent"), 2400);
    assert_eq!(e.metric("tokens_reported"), 2400 * 7);
    assert_eq!(e.metric("reports.dropped") + e.metric("reports.failed"), 0);
}

#[test]
fn thousands_of_requests_charged_exactly_memory() {
    thousands_of_requests_are_charged_exactly(&[]);
}

#[test]
fn thousands_of_requests_charged_exactly_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    thousands_of_requests_are_charged_exactly(&["--store", "redis", "--redis-url", &url]);
}

/// The service is SIGKILLed under load and comes back 1.5 s later on the same port, its
/// counters in Redis. `allow`: every request is served; `deny`: requests during the outage get
/// the fail-closed 503. Either way every served request is charged, nothing twice.
fn service_killed_and_restarted_under_load(failure_mode: &'static str) {
    let redis = RedisServer::start();
    let url: &'static str = Box::leak(redis.url().into_boxed_str());
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--store", "redis", "--redis-url", url];
    let mut svc = Service::start_at(service::binary(), &listen, &args, &[]);
    let llm = mock_llm();
    let e = Envoy::start(
        &config(failure_mode),
        &[cluster("ratelimit", port), cluster("upstream", llm.port)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            svc.kill();
            std::thread::sleep(Duration::from_millis(1500));
            let again = Service::start_at(service::binary(), &listen, &args, &[]);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            again
        })
    };
    let (used, statuses) = load(e.port, 8, 150, Duration::from_millis(10));
    assert_eq!(statuses.values().sum::<u64>(), 1200, "no request hung");
    match failure_mode {
        "allow" => {
            assert_eq!(statuses, BTreeMap::from([(200, 1200)]));
            assert!(e.metric("failure_mode_allowed") > 0, "the outage was seen");
        }
        _ => {
            assert!(
                statuses.keys().all(|s| *s == 200 || *s == 503),
                "{statuses:?}"
            );
            assert!(statuses.get(&503).is_some_and(|n| *n > 0), "{statuses:?}");
            assert_eq!(e.metric("failure_mode_denied"), statuses[&503]);
        }
    }
    // Counters live in Redis: everything served before, during and after the outage is there.
    await_spent(port, &used);
    stop.store(true, Ordering::SeqCst);
    let _again = chaos.join().unwrap();
    assert_eq!(e.metric("reports.dropped") + e.metric("reports.failed"), 0);
}

#[test]
fn the_service_killed_and_restarted_under_load_fail_open() {
    service_killed_and_restarted_under_load("allow");
}

#[test]
fn the_service_killed_and_restarted_under_load_fail_closed() {
    service_killed_and_restarted_under_load("deny");
}

#[test]
fn reports_made_while_redis_was_down_land_when_it_returns() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let (svc, llm) = (
        Service::start(&["--store", "redis", "--redis-url", &url], &[]),
        mock_llm(),
    );
    let e = Envoy::start(
        &config("allow"),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let (before, statuses) = load(e.port, 4, 10, Duration::ZERO);
    assert_eq!(statuses, BTreeMap::from([(200, 40)]));
    await_spent(svc.port, &before);
    redis.kill();
    // Checks fail (503 from the service: fail-open), reports fail and are retried.
    let (during, statuses) = load(e.port, 4, 10, Duration::ZERO);
    assert_eq!(statuses, BTreeMap::from([(200, 40)]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(e.metric("reports.retried") > 0);
    // Redis comes back empty: what it then holds is exactly what was reported meanwhile.
    redis.start_again();
    await_spent(svc.port, &during);
    assert_eq!(e.metric("reports.dropped") + e.metric("reports.failed"), 0);
}

#[test]
fn an_upstream_reset_mid_stream_ends_the_request_and_charges_what_was_seen() {
    let svc = Service::start(&[], &[]);
    let events: String = (0..10)
        .map(|i| {
            format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
                format!("{i}").repeat(40)
            )
        })
        .collect();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
        events.len() * 10
    );
    let up = Server::start(move |_| Behaviour::Raw(format!("{head}{events}").into_bytes()));
    let e = Envoy::start(
        &json!({"service": {"cluster": "ratelimit"}, "inject_stream_usage": false, "usage": {"on_missing": "zero"},
                "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"}]}),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let started = Instant::now();
    let r = http::try_send_to(
        &format!("127.0.0.1:{}", e.port),
        "POST",
        "/v1/chat/completions",
        &[("x-user", "cut"), ("content-type", "application/json")],
        br#"{"stream": true}"#,
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the request hung"
    );
    if let Ok(r) = &r {
        assert!(r.body.len() < 4000, "a cut stream is not a whole one");
    }
    // 10 events of 40 text bytes were seen: 100 tokens, plus the prompt's 4, even under `zero`.
    let mut want = BTreeMap::new();
    want.insert("cut".to_string(), 100 + 4);
    await_spent(svc.port, &want);
    assert_eq!(e.metric("usage.estimated"), 1);
}
