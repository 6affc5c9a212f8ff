//! Quota leases (`service.admission: "lease"`) in a real Envoy with two workers (two plugin
//! VMs) against the real rate-limit service, on memory and on Redis: a hot key is admitted
//! without a check per request and every token is still charged; fifty concurrent clients
//! never get more than the budget; a lease never outlives its expiry while the service is
//! down; a service restart on Redis loses no charge.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Server};
use testkit::redis::RedisServer;
use testkit::service::Service;

fn config(budget: u64) -> Value {
    json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 2000, "failure_mode": "deny", "admission": "lease"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": budget, "window": "1h"}],
        "reserve": {"tokens": "max_tokens"}
    })
}

fn gateway(svc: &Service, up: &Server, budget: u64) -> Envoy {
    Envoy::start_with_workers(
        &config(budget),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
        2,
    )
}

fn ask(e: &Envoy, user: &str, max_tokens: u64) -> u16 {
    http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", user)],
        &json!({"model": "m", "max_tokens": max_tokens, "messages": []}),
    )
    .status
}

/// A figure of the service's `/metrics`.
fn service_metric(svc: &Service, series: &str) -> u64 {
    let text = http::send(svc.port, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// `threads` clients send requests of `max_tokens` for `user` until `each` have been sent
/// each (or, with `until_refused`, until each is refused); the tokens admitted.
fn load(
    e: &Envoy,
    user: &str,
    threads: usize,
    each: usize,
    max_tokens: u64,
    until_refused: bool,
) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let admitted = admitted.clone();
            s.spawn(move || {
                for _ in 0..each {
                    match ask(e, user, max_tokens) {
                        200 => {
                            admitted.fetch_add(max_tokens, Ordering::SeqCst);
                        }
                        429 if until_refused => return,
                        status => panic!("status {status}"),
                    }
                }
            });
        }
    });
    admitted.load(Ordering::SeqCst)
}

/// A hot key is admitted mostly under leases, and what every request used is charged, exactly,
/// once the leases have ended and given back what they did not use. On Redis the service is
/// restarted in the middle: leases are stored like reservations, so nothing is lost.
fn a_hot_key_is_admitted_under_leases_and_every_token_is_charged(redis: Option<&RedisServer>) {
    let args: Vec<String> = match redis {
        Some(r) => vec![
            "--store".into(),
            "redis".into(),
            "--redis-url".into(),
            r.url(),
        ],
        None => vec![],
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut svc = Service::start(&args, &[]);
    let up = http::uses_max_tokens();
    let budget = 10_000_000;
    let e = gateway(&svc, &up, budget);
    let mut admitted = load(&e, "hot", 8, 250, 100, false);
    if redis.is_some() {
        // The service goes away and comes back on the same port, counters in Redis.
        let port = svc.port;
        svc.kill();
        svc = Service::start_at(
            testkit::service::binary(),
            &format!("127.0.0.1:{port}"),
            &args,
            &[],
        );
        admitted += load(&e, "hot", 8, 250, 100, false);
    }
    let requests = admitted / 100;
    let leased = e.metric("leases.admitted");
    let checks = e.metric("checks_allowed");
    eprintln!("{requests} requests: {leased} under leases, {checks} checked");
    assert_eq!(leased + checks, requests, "every request admitted once");
    assert!(
        checks * 4 < requests,
        "{checks} checks for {requests} requests: leases admit most of them"
    );
    assert!(e.metric("leases.granted") >= 2, "{:?}", e.metrics());
    // Leases end within their time (2 s) and give back what they did not use: the counter then
    // holds exactly what was used.
    svc.await_remaining("user", "hot", budget - admitted);
    assert_eq!(e.metric("reports.dropped") + e.metric("reports.failed"), 0);
}

#[test]
fn a_hot_key_on_memory() {
    a_hot_key_is_admitted_under_leases_and_every_token_is_charged(None);
}

#[test]
fn a_hot_key_on_redis_survives_a_service_restart() {
    let redis = RedisServer::start();
    a_hot_key_is_admitted_under_leases_and_every_token_is_charged(Some(&redis));
}

/// The bound: leases add no overshoot. Fifty concurrent clients over two VMs spend a budget
/// that leases are granted on (a tenth of what remains, at most), each request using exactly
/// its reservation: no more than the budget is admitted, and the counter ends at zero.
#[test]
fn fifty_concurrent_clients_over_two_vms_get_no_more_than_the_budget() {
    let svc = Service::start(&[], &[]);
    let up = http::uses_max_tokens();
    let budget = 200_000;
    let e = gateway(&svc, &up, budget);
    let admitted = load(&e, "team", 50, 10_000, 100, true);
    eprintln!(
        "{admitted} of {budget} admitted, {} under leases",
        e.metric("leases.admitted")
    );
    assert!(admitted <= budget, "{admitted} admitted of {budget}");
    assert!(e.metric("leases.admitted") > 0, "{:?}", e.metrics());
    // Refused only when what is left (leases given back) cannot hold one more request.
    svc.await_remaining("user", "team", budget - admitted);
    assert!(
        budget - admitted < 100 * 50,
        "{admitted} admitted of {budget}"
    );
    assert!(service_metric(&svc, "ratelimit_leases_total{outcome=\"granted\"}") > 0);
}

/// With the service gone, a VM admits under the lease it holds until the lease's time is up,
/// never after: then `failure_mode` (here `deny`) applies, as without leases.
#[test]
fn a_lease_never_outlives_its_expiry_while_the_service_is_down() {
    let mut svc = Service::start(&["--lease-ttl-ms", "4000"], &[]);
    let up = http::uses_max_tokens();
    let e = gateway(&svc, &up, 10_000_000);
    // Warm: leases held by both VMs (renewed at half their life, so each has ≥ 2 s left).
    load(&e, "warm", 4, 200, 100, false);
    assert!(e.metric("leases.admitted") > 0);
    svc.kill();
    let before = e.metric("leases.admitted");
    let served: Vec<u16> = (0..10).map(|_| ask(&e, "warm", 100)).collect();
    assert!(
        served.contains(&200),
        "admitted under the lease: {served:?}"
    );
    assert!(e.metric("leases.admitted") > before);
    // Past any lease's expiry (4 s from its ask): every request meets the failure mode.
    std::thread::sleep(Duration::from_millis(4_500));
    let after: Vec<u16> = (0..10).map(|_| ask(&e, "warm", 100)).collect();
    assert!(after.iter().all(|&s| s == 503), "{after:?}");
}
