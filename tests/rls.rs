//! `service.protocol: "envoy-rls"` in a real Envoy against a gRPC stand-in of Envoy's rate-limit
//! service (`ShouldRateLimit` over h2c, written here with hyper and the plugin's own prost
//! messages): allow with quota headers, deny with Retry-After, gRPC errors under both failure
//! modes, and reports carrying the right `hits_addend`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use llm_token_ratelimit::rls::{
    DescriptorStatus, Duration as PbDuration, Message, RateLimit, RateLimitRequest,
    RateLimitResponse, CODE_OK, CODE_OVER_LIMIT,
};
use serde_json::json;
use testkit::envoy::{cluster, cluster_h2, Envoy};
use testkit::http;
use testkit::service::mock_llm;

/// What the stand-in answers: a response, or a gRPC error status.
#[derive(Clone)]
enum Answer {
    Reply(RateLimitResponse),
    Error(u32),
}

type Handler = Arc<dyn Fn(&RateLimitRequest) -> Answer + Send + Sync>;

struct Rls {
    port: u16,
    seen: Arc<Mutex<Vec<RateLimitRequest>>>,
    /// The `authorization` metadata of each call.
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
}

impl Rls {
    fn start(handler: impl Fn(&RateLimitRequest) -> Answer + Send + Sync + 'static) -> Rls {
        let handler: Handler = Arc::new(handler);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let record = seen.clone();
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let auth = authorizations.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (handler, record, auth) = (handler.clone(), record.clone(), auth.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            auth.lock().unwrap().push(
                                req.headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from),
                            );
                            answer(req, handler.clone(), record.clone())
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Rls {
            port,
            seen,
            authorizations,
        }
    }

    fn seen(&self) -> Vec<RateLimitRequest> {
        self.seen.lock().unwrap().clone()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    handler: Handler,
    record: Arc<Mutex<Vec<RateLimitRequest>>>,
) -> Result<Response<Body>, Infallible> {
    assert_eq!(
        req.uri().path(),
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // A gRPC frame: compressed flag, 4-byte length, the message.
    let message = RateLimitRequest::decode(&body[5..]).unwrap();
    let outcome = handler(&message);
    record.lock().unwrap().push(message);
    let mut trailers = hyper::HeaderMap::new();
    let data = match outcome {
        Answer::Reply(resp) => {
            trailers.insert("grpc-status", "0".parse().unwrap());
            let bytes = resp.encode_to_vec();
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            frame.extend_from_slice(&bytes);
            frame
        }
        Answer::Error(code) => {
            trailers.insert("grpc-status", code.to_string().parse().unwrap());
            Vec::new()
        }
    };
    let body = Full::new(Bytes::from(data))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap())
}

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
    let auth = rls.authorizations.lock().unwrap().clone();
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

/// A stand-in that behaves as Limitador does: a `ShouldRateLimit` whose `hits_addend` would pass
/// the limit is answered OVER_LIMIT and not counted. A limit of 100 tokens per user, answers of
/// 30 tokens (1 reserved at the check, 29 reported): four requests are served, the fourth's
/// report is refused, the plugin sends what still fits (9), and the fifth is denied. (Before,
/// every report crossing the limit was lost, and 13 requests were served.)
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
