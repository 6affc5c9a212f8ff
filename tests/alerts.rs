//! Budget alerts with real parts: Envoy with the plugin, the service (memory, and Redis with
//! two replicas behind one Envoy cluster) and a real HTTP receiver. Each threshold of a limit's
//! `alerts` reaches the receiver once per key and window, signed; a receiver that fails is
//! retried with backoff, one that is dead is given up after the set attempts and counted; a
//! receiver's refusal is not retried; the console lists the alerts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, Server};
use testkit::redis::RedisServer;
use testkit::service::{mock_llm, Service};

const SECRET: &str = "a-signing-secret-of-some-length";

/// A receiver that answers 200 to every post.
fn receiver() -> Server {
    Server::start(|_| http::json_reply(200, json!({"ok": true})))
}

fn hook(r: &Server) -> String {
    format!("http://127.0.0.1:{}/hooks/budget", r.port)
}

/// Waits until `server` has `n` requests (fails after 20 s), then a little longer to see that
/// no more come.
fn await_posts(server: &Server, n: usize) -> Vec<http::Request> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.requests().len() < n {
        assert!(
            Instant::now() < deadline,
            "{} posts of {n}: {:?}",
            server.requests().len(),
            server
                .requests()
                .iter()
                .map(http::Request::json)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    server.requests()
}

/// A service's counter from `/metrics` (0 when absent).
fn metric(svc: &Service, series: &str) -> u64 {
    let text = http::send(svc.port, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |n| n.trim().parse().unwrap())
}

fn await_metric(svc: &Service, series: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(svc, series) != want {
        assert!(
            Instant::now() < deadline,
            "{series}: {} (want {want})",
            metric(svc, series)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify_signature(post: &http::Request) {
    use hmac::Mac;
    let timestamp = post.header("x-ltr-timestamp").expect("a signed post");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&post.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        post.header("x-ltr-signature"),
        Some(format!("v1={want}").as_str())
    );
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .abs_diff(timestamp.parse().unwrap());
    assert!(age < 120, "the timestamp is now: {timestamp}");
}

fn plugin_config(key: &str) -> Value {
    json!({
        "service": {"cluster": "ratelimit"},
        "limits": [
            {"name": "team", "key": key, "tokens": 100, "window": "1h",
             "alerts": [0.5, 0.8, 1.0]}
        ]
    })
}

fn ask(port: u16, team: &str) -> http::Response {
    http::post_json(
        port,
        "/v1/chat/completions",
        &[
            ("x-team", team),
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "20"),
        ],
        &json!({"model": "m", "max_tokens": 20}),
    )
}

#[test]
fn each_threshold_reaches_a_real_receiver_once_signed_and_on_the_console() {
    let hooks = receiver();
    let url = hook(&hooks);
    let svc = Service::start(
        &[
            "--alert-webhook",
            &url,
            "--alert-secret",
            SECRET,
            "--admin-token",
            "console-admin-token-1234",
        ],
        &[],
    );
    let llm = mock_llm();
    let e = Envoy::start(
        &plugin_config("{{request.headers.x-team}}"),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // 30 tokens an answer: 30, 60 (0.5), 90 (0.8), 120 (1.0).
    for (i, left) in [70, 40, 10].iter().enumerate() {
        assert_eq!(ask(e.port, "red").status, 200, "request {i}");
        svc.await_remaining("team", "red", *left);
    }
    assert_eq!(ask(e.port, "red").status, 200);
    svc.await_remaining("team", "red", 0);
    let posts = await_posts(&hooks, 3);
    assert_eq!(posts.len(), 3, "once per threshold");
    let mut thresholds = Vec::new();
    for post in &posts {
        assert_eq!(
            (post.method.as_str(), post.path.as_str()),
            ("POST", "/hooks/budget")
        );
        assert_eq!(post.header("content-type"), Some("application/json"));
        verify_signature(post);
        let a = post.json();
        assert_eq!(post.header("x-ltr-alert-id"), a["id"].as_str());
        assert_eq!(
            (a["limit"].as_str(), a["key"].as_str()),
            (Some("team"), Some("red"))
        );
        assert_eq!(
            (a["budget"].as_f64(), a["currency"].as_null()),
            (Some(100.0), Some(()))
        );
        assert_eq!(a["shared"], false);
        let (start, end) = (
            a["window_start"].as_str().unwrap(),
            a["window_end"].as_str().unwrap(),
        );
        assert!(
            start.ends_with(":00:00Z") && end.ends_with(":00:00Z"),
            "{a}"
        );
        let text = a["text"].as_str().unwrap();
        assert!(text.contains("limit `team`, key `red`"), "{text}");
        thresholds.push((
            a["threshold"].as_f64().unwrap(),
            a["used"].as_f64().unwrap(),
        ));
    }
    thresholds.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        thresholds,
        [(0.5, 60.0), (0.8, 90.0), (1.0, 120.0)],
        "each raised by the report that reached it, with the spend it reached"
    );
    let ids: std::collections::BTreeSet<_> = posts
        .iter()
        .map(|p| p.json()["id"].clone().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    // Another team has its own alerts; more spend by red raises nothing more.
    assert_eq!(ask(e.port, "blue").status, 200);
    assert_eq!(ask(e.port, "blue").status, 200);
    assert_eq!(await_posts(&hooks, 4).len(), 4);
    assert_eq!(hooks.requests()[3].json()["key"], "blue");
    // Metrics and the console.
    assert_eq!(
        metric(
            &svc,
            "ratelimit_alerts_total{limit=\"team\",threshold=\"0.5\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &svc,
            "ratelimit_alerts_total{limit=\"team\",threshold=\"1\"}"
        ),
        1
    );
    await_metric(
        &svc,
        "ratelimit_alert_deliveries_total{outcome=\"sent\"}",
        4,
    );
    assert_eq!(
        metric(&svc, "ratelimit_alert_deliveries_total{outcome=\"failed\"}"),
        0
    );
    let console = http::send(
        svc.port,
        "GET",
        "/v1/console/alerts",
        &[("authorization", "Bearer console-admin-token-1234")],
        b"",
    )
    .json();
    let listed = console["alerts"].as_array().unwrap();
    assert_eq!(listed.len(), 4, "{console}");
    assert_eq!(listed[0]["value"], "blue", "newest first");
    assert_eq!(listed[3]["threshold"], "0.5");
    assert_eq!(listed[1]["used"], "120 tokens");
}

/// Two replicas of the service on one Redis behind one Envoy cluster, many teams crossing
/// their thresholds at once: every crossing reaches the receiver exactly once.
#[test]
fn several_replicas_on_redis_raise_each_crossing_once() {
    let redis = RedisServer::start();
    let hooks = receiver();
    let url = hook(&hooks);
    let args = ["--redis-url", &redis.url(), "--alert-webhook", &url];
    let replicas = [Service::start(&args, &[]), Service::start(&args, &[])];
    let llm = mock_llm();
    // One gateway per replica (a load balancer may send every report call to one replica),
    // the same teams through both.
    let gateways: Vec<Envoy> = replicas
        .iter()
        .map(|r| {
            Envoy::start(
                &plugin_config("{{request.headers.x-team}}"),
                &[cluster("ratelimit", r.port), cluster("upstream", llm.port)],
            )
        })
        .collect();
    let teams: Vec<String> = (0..6).map(|i| format!("team-{i}")).collect();
    let served = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let port = gateways[i % 2].port;
            let (teams, served) = (teams.clone(), served.clone());
            std::thread::spawn(move || {
                for _ in 0..5 {
                    for team in &teams {
                        if ask(port, team).status == 200 {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // 20 asks per team of 30 tokens on a budget of 100: every team reaches 1.0.
    for team in &teams {
        let deadline = Instant::now() + Duration::from_secs(20);
        while replicas[0].remaining("team", team) != Some(0) {
            assert!(Instant::now() < deadline, "{team} never spent its budget");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let posts = await_posts(&hooks, teams.len() * 3);
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for p in &posts {
        let a = p.json();
        *seen
            .entry((
                a["key"].as_str().unwrap().to_string(),
                a["threshold"].to_string(),
            ))
            .or_default() += 1;
    }
    assert_eq!(
        posts.len(),
        teams.len() * 3,
        "one post per crossing: {seen:?}"
    );
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    // Both replicas applied reports, and between them raised each crossing once.
    let raised: u64 = ["0.5", "0.8", "1"]
        .iter()
        .flat_map(|t| {
            replicas.iter().map(move |r| {
                metric(
                    r,
                    &format!("ratelimit_alerts_total{{limit=\"team\",threshold=\"{t}\"}}"),
                )
            })
        })
        .sum();
    assert_eq!(raised, teams.len() as u64 * 3);
    for r in &replicas {
        assert!(metric(r, "ratelimit_reports_total{outcome=\"accepted\"}") > 0);
    }
    assert!(served.load(Ordering::Relaxed) >= teams.len() * 4);
}

/// A report straight to the service that brings `limit`/`value` (budget 100 tokens, alerts at
/// 0.5) to 60 tokens.
fn cross(svc: &Service, limit: &str, id: &str) {
    let report = json!({"reports": [{
        "id": id,
        "descriptors": [{"limit": limit, "value": "v",
                         "rates": [{"tokens": 100, "window_s": 3600}], "alerts": [0.5]}],
        "tokens": 60
    }]});
    let r = http::post_json(svc.port, "/v1/report", &[], &report);
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());
}

#[test]
fn a_failing_receiver_is_retried_a_refusing_one_is_not_and_a_dead_one_is_given_up() {
    // Fails twice, then takes it: retried with backoff, sent once.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let flaky = Server::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) < 2 {
            http::json_reply(503, json!({"error": "busy"}))
        } else {
            http::json_reply(200, json!({}))
        }
    });
    let svc = Service::start(
        &["--alert-webhook", &hook(&flaky), "--alert-backoff-ms", "20"],
        &[],
    );
    cross(&svc, "flaky", "00000000000000ab-1");
    await_metric(
        &svc,
        "ratelimit_alert_deliveries_total{outcome=\"sent\"}",
        1,
    );
    let posts = flaky.requests();
    assert_eq!(posts.len(), 3);
    assert!(
        posts
            .iter()
            .all(|p| p.header("x-ltr-alert-id") == posts[0].header("x-ltr-alert-id")),
        "one alert, posted three times under one id"
    );
    assert!(
        posts[0].header("x-ltr-signature").is_none(),
        "no secret: unsigned"
    );
    assert_eq!(metric(&svc, "ratelimit_alert_retries_total"), 2);

    // A 400 is the receiver's refusal: not retried, counted as failed.
    let refusing = Server::start(|_| http::json_reply(400, json!({"error": "no"})));
    let svc = Service::start(
        &[
            "--alert-webhook",
            &hook(&refusing),
            "--alert-backoff-ms",
            "20",
        ],
        &[],
    );
    cross(&svc, "refused", "00000000000000ab-1");
    await_metric(
        &svc,
        "ratelimit_alert_deliveries_total{outcome=\"failed\"}",
        1,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(refusing.requests().len(), 1);
    assert_eq!(metric(&svc, "ratelimit_alert_retries_total"), 0);

    // Nobody listens: three attempts, then counted as failed; checks and reports go on.
    let dead = format!("http://127.0.0.1:{}/hook", testkit::free_port());
    let svc = Service::start(
        &[
            "--alert-webhook",
            &dead,
            "--alert-attempts",
            "3",
            "--alert-backoff-ms",
            "20",
        ],
        &[],
    );
    cross(&svc, "dead", "00000000000000ab-1");
    await_metric(
        &svc,
        "ratelimit_alert_deliveries_total{outcome=\"failed\"}",
        1,
    );
    assert_eq!(metric(&svc, "ratelimit_alert_retries_total"), 2);
    assert_eq!(
        metric(&svc, "ratelimit_alert_deliveries_total{outcome=\"sent\"}"),
        0
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&svc, "ratelimit_alert_retries_total"),
        2,
        "not retried forever"
    );
    assert!(svc.log().contains("alert not delivered"), "{}", svc.log());
    assert!(
        !svc.log().contains("/hook"),
        "the webhook's path (a secret for Slack) is never logged"
    );
    let r = http::post_json(
        svc.port,
        "/v1/check",
        &[],
        &json!({"descriptors": [{"limit": "dead", "value": "v", "rates": [{"tokens": 100, "window_s": 3600}]}]}),
    );
    assert_eq!(r.json()["allowed"], true);
}

#[test]
fn alerts_are_checked_at_load() {
    let refused = |limit: Value, service: Value, want: &str| {
        let config = json!({"service": service, "limits": [limit]});
        let err = llm_token_ratelimit::config::Config::parse(config.to_string().as_bytes())
            .err()
            .unwrap_or_else(|| panic!("accepted: {config}"))
            .to_string();
        assert!(err.contains(want), "{config}: {err}");
    };
    let v1 = json!({"cluster": "ratelimit"});
    let limit = |alerts: Value| json!({"name": "l", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1h", "alerts": alerts});
    refused(limit(json!([0.5, 0])), v1.clone(), "limits[0].alerts[1]");
    refused(limit(json!([11])), v1.clone(), "limits[0].alerts[0]");
    refused(limit(json!([-0.5])), v1.clone(), "limits[0].alerts[0]");
    refused(limit(json!([0.5, 0.5])), v1.clone(), "repeats");
    refused(limit(json!([])), v1.clone(), "limits[0].alerts");
    refused(
        limit(json!([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])),
        v1.clone(),
        "1 to 8",
    );
    refused(limit(json!(["0.5"])), v1.clone(), "alerts");
    refused(
        json!({"name": "l", "key": "{{request.headers.x-user}}", "alerts": [0.5]}),
        v1.clone(),
        "needs the limit's own rates",
    );
    for service in [
        json!({"cluster": "ratelimit", "protocol": "asm"}),
        json!({"cluster": "ratelimit", "protocol": "envoy-rls", "domain": "llm"}),
    ] {
        refused(
            json!({"name": "l", "key": "{{request.headers.x-user}}", "alerts": [0.5]}),
            service,
            "needs protocol \"v1\"",
        );
    }
    // Accepted: fractions above 1 (a soft budget run past), in any order.
    let ok = json!({"service": v1, "limits": [limit(json!([2, 0.5, 1]))]});
    assert!(llm_token_ratelimit::config::Config::parse(ok.to_string().as_bytes()).is_ok());
}
