//! Reports at production scale, in a real Envoy against the real service: a 15-second outage
//! under fail-open load loses nothing, a report the service can never apply delays nobody, and
//! a configuration change under load loses no report.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, reply, Server};
use testkit::redis::RedisServer;
use testkit::service::{self, mock_llm, Service};

const BUDGET: u64 = 1_000_000_000;
const USED: u64 = 10;

fn config(service_extra: Value) -> Value {
    let mut service = json!({"cluster": "ratelimit", "timeout_ms": 300, "failure_mode": "allow"});
    service
        .as_object_mut()
        .unwrap()
        .extend(service_extra.as_object().unwrap().clone());
    json!({
        "service": service,
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1d"}]
    })
}

fn ask(port: u16, user: &str) -> u16 {
    http::post_json(
        port,
        "/v1/chat/completions",
        &[
            ("x-user", user),
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "10"),
        ],
        &json!({"model": "m"}),
    )
    .status
}

/// Load from `threads` clients over `users` users until `stop`; 200s per user.
fn load(
    port: u16,
    threads: usize,
    users: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<HashMap<String, u64>> {
    std::thread::spawn(move || {
        let served = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
        std::thread::scope(|s| {
            for t in 0..threads {
                let (served, stop) = (served.clone(), stop.clone());
                s.spawn(move || {
                    let mut i = t;
                    while !stop.load(Ordering::SeqCst) {
                        let user = format!("u{}", i % users);
                        if ask(port, &user) == 200 {
                            *served.lock().unwrap().entry(user).or_insert(0) += 1;
                        }
                        i += threads;
                    }
                });
            }
        });
        Arc::try_unwrap(served).unwrap().into_inner().unwrap()
    })
}

fn await_exact(svc: &Service, served: &HashMap<String, u64>) {
    assert!(!served.is_empty());
    for (user, n) in served {
        svc.await_remaining("user", user, BUDGET - n * USED);
    }
}

#[test]
fn a_15_second_outage_under_fail_open_load_loses_nothing() {
    let redis = RedisServer::start();
    let args = ["--store", "redis", "--redis-url", &redis.url()];
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut svc = Service::start_at(service::binary(), &listen, &args, &[]);
    let llm = mock_llm();
    let e = Envoy::start(
        &config(json!({})),
        &[cluster("ratelimit", port), cluster("upstream", llm.port)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(e.port, 4, 100, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    svc.kill();
    std::thread::sleep(Duration::from_secs(15));
    let svc = Service::start_at(service::binary(), &listen, &args, &[]);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let served = clients.join().unwrap();
    assert!(
        e.metric("failure_mode_allowed") > 100,
        "the load ran through the outage"
    );
    await_exact(&svc, &served);
    assert_eq!(e.metric("reports.dropped"), 0);
    assert_eq!(e.metric("reports.failed"), 0);
}

#[test]
fn a_report_that_can_never_be_applied_delays_nobody() {
    // Redis, where a report with nothing to charge used to fail its whole batch.
    let redis = RedisServer::start();
    let svc = Service::start(&["--store", "redis", "--redis-url", &redis.url()], &[]);
    let llm = mock_llm();
    let mut c = config(json!({}));
    c["limits"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tier", "key": "{{request.headers.x-tier}}"}));
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // Only a service-owned limit that no rule of the service matches.
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-tier", "no-rule-matches")],
        &json!({}),
    );
    assert_eq!(r.status, 200);
    // Charged at once, not after the poisoned batch's retries (await_remaining gives up
    // after 20 s; such a batch used to hold the queue for about 100 s).
    assert_eq!(ask(e.port, "next"), 200);
    svc.await_remaining("user", "next", BUDGET - USED);

    // A service that refuses every batch holding one poisoned report: the plugin finds it by
    // sending reports alone, drops it, and everyone else's usage arrives.
    let real = Service::start(&[], &[]);
    let real_port = real.port;
    let picky = Server::start(move |req| {
        let is_report = req.path == "/v1/report";
        if is_report && String::from_utf8_lossy(&req.body).contains("poison") {
            return reply(400, "application/json", r#"{"error":"poisoned"}"#);
        }
        http::forward(real_port, req)
    });
    let e = Envoy::start(
        &config(json!({})),
        &[
            cluster("ratelimit", picky.port),
            cluster("upstream", llm.port),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(e.port, 3, 10, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ask(e.port, "poison"), 200);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let served = clients.join().unwrap();
    await_exact(&real, &served);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.metric("reports.failed") != 1 {
        assert!(
            Instant::now() < deadline,
            "the poisoned report is dropped alone"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        real.remaining("user", "poison"),
        Some(BUDGET),
        "never charged"
    );
}

#[test]
fn a_configuration_change_under_load_loses_no_report() {
    let svc = Service::start(&[], &[]);
    let llm = mock_llm();
    let clusters = [
        cluster("ratelimit", svc.port),
        cluster("upstream", llm.port),
    ];
    let e = Envoy::start_reconfigurable(&config(json!({})), &clusters);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(e.port, 4, 20, stop.clone());
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        // Another configuration (Envoy makes a new root context for it).
        e.reconfigure(&config(json!({"timeout_ms": 300 + i})));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let served = clients.join().unwrap();
    assert!(
        e.log().matches("llm-token-ratelimit configured").count() >= 5,
        "{}",
        e.log()
    );
    await_exact(&svc, &served);
    assert_eq!(e.metric("reports.dropped"), 0);
}

/// Envoy 1.40 calls the plugin's `on_done` when it stops but does not wait for the calls made
/// there, so the way to stop without losing a report is to let the queue empty first (the
/// `report_queue` gauge at 0), as the README says: here a report held for its retry.
#[test]
fn a_graceful_stop_waits_for_the_queue_to_empty() {
    let svc = Service::start(&[], &[]);
    let real = svc.port;
    // The first report is refused as an outage, so the plugin holds it for its backoff.
    let refused_once = Arc::new(AtomicBool::new(false));
    let flag = refused_once.clone();
    let flaky = Server::start(move |req| {
        if req.path == "/v1/report" && !flag.swap(true, Ordering::SeqCst) {
            return reply(503, "application/json", r#"{"error":"busy"}"#);
        }
        http::forward(real, req)
    });
    let llm = mock_llm();
    let mut e = Envoy::start(
        &config(json!({})),
        &[
            cluster("ratelimit", flaky.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(e.port, "last"), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused_once.load(Ordering::SeqCst) || e.metric("report_queue") > 0 {
        assert!(
            Instant::now() < deadline,
            "the queue empties after the retry"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    e.terminate();
    svc.await_remaining("user", "last", BUDGET - USED);
}
