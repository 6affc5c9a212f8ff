//! Streams that end cleanly, in Envoy with the real service and the mock LLM: a stream whose
//! charge passes what its budget had for it ends in its provider's own shape, is charged what
//! the client received, and an upstream that goes on past the drain is reset.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http;
use testkit::service::{mock_llm, Service};

const BUDGET: u64 = 200;
/// The most a stream is charged past its budget: the event that passed it (40 bytes of text
/// at 4 bytes a token).
const EVENT_TOKENS: u64 = 10;

fn config(extra: Value) -> Value {
    let mut c = json!({
        "service": {"cluster": "ratelimit"},
        "stream_cutoff": true,
        "limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"},
            // The same requests on a budget they never reach: what each is charged.
            {"name": "meter", "key": "{{request.headers.x-user}}", "tokens": 1000000, "window": "1h"}
        ]
    });
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    c
}

struct Gateway {
    svc: Service,
    _llm: Service,
    envoy: Envoy,
}

fn gateway(extra: Value) -> Gateway {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let envoy = Envoy::start(
        &config(extra),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    Gateway {
        svc,
        _llm: llm,
        envoy,
    }
}

impl Gateway {
    /// What `user` was charged, in all, once it is more than `past` (the reservation shows
    /// before the report).
    fn charged(&self, user: &str, past: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let used = 1_000_000 - self.svc.remaining("meter", user).unwrap_or(1_000_000);
            if used > past || std::time::Instant::now() > deadline {
                return used;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An upstream that streams `tokens` output tokens, 10 to an event, whatever the cap.
fn runaway(user: &str, tokens: u64, delay_ms: u64) -> Vec<(String, String)> {
    [
        ("x-user", user.to_string()),
        ("x-mock-ignore-cap", "1".into()),
        ("x-mock-prompt-tokens", "10".into()),
        ("x-mock-completion-tokens", tokens.to_string()),
        ("x-mock-piece-bytes", "40".into()),
        ("x-mock-delay-ms", delay_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The events of an event stream: (name, data).
fn events(body: &str) -> Vec<(Option<String>, String)> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_string);
            let data = e
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n");
            (name, data)
        })
        .collect()
}

/// Each API's stream ends at the budget in its own shape, once; the upstream's own end never
/// reaches the client; the charge is what the client received, the budget plus at most the event that passed it.
#[test]
fn every_shape_ends_in_its_own_words_and_is_charged_what_it_delivered() {
    let g = gateway(json!({}));
    let shapes = [
        (
            "chat",
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "resp",
            "/v1/responses",
            json!({"model": "m", "stream": true, "input": "hi"}),
        ),
        (
            "msg",
            "/v1/messages",
            json!({"model": "m", "stream": true, "max_tokens": 64}),
        ),
        (
            "gem",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            json!({"contents": []}),
        ),
    ];
    for (user, path, body) in shapes {
        let headers = runaway(user, 2000, 1);
        let mut h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        h.push(("content-type", "application/json"));
        let r = http::send(g.envoy.port, "POST", path, &h, body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{user}");
        let text = r.text();
        let evs = events(&text);
        let (last_name, last) = evs.last().unwrap().clone();
        let data = |i: usize| -> Value { serde_json::from_str(&evs[i].1).unwrap() };
        let n = evs.len();
        // The figures the end states, and the text the client got before it.
        let (stated, delivered): (u64, usize) = match user {
            "chat" => {
                assert_eq!(last, "[DONE]");
                assert_eq!(data(n - 3)["choices"][0]["finish_reason"], "length");
                assert_eq!(text.matches("finish_reason\":\"").count(), 1, "{text}");
                let text: usize = evs[..n - 3]
                    .iter()
                    .map(|(_, d)| {
                        serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                            .as_str()
                            .map_or(0, str::len)
                    })
                    .sum();
                (data(n - 2)["usage"]["total_tokens"].as_u64().unwrap(), text)
            }
            "resp" => {
                assert_eq!(last_name.as_deref(), Some("response.incomplete"));
                let v = data(n - 1);
                assert_eq!(
                    v["response"]["incomplete_details"]["reason"],
                    "max_output_tokens"
                );
                assert!(!text.contains("response.completed"));
                let text = text.matches("output_text.delta\",").count() * 40;
                (
                    v["response"]["usage"]["total_tokens"].as_u64().unwrap(),
                    text,
                )
            }
            "msg" => {
                assert_eq!(last_name.as_deref(), Some("message_stop"));
                let v = data(n - 2);
                assert_eq!(v["delta"]["stop_reason"], "max_tokens");
                assert_eq!(
                    text.matches("message_stop").count(),
                    2,
                    "one event, named: {text}"
                );
                assert!(!text.contains("end_turn"));
                let text = text.matches("text_delta").count() * 40;
                (10 + v["usage"]["output_tokens"].as_u64().unwrap(), text)
            }
            _ => {
                let v = data(n - 1);
                assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
                assert_eq!(text.matches("finishReason").count(), 1, "{text}");
                let text = (n - 1) * 40;
                (
                    v["usageMetadata"]["totalTokenCount"].as_u64().unwrap(),
                    text,
                )
            }
        };
        let charged = g.charged(user, BUDGET);
        std::fs::write(format!("/tmp/cut-{user}.txt"), &text).unwrap();
        assert_eq!(charged, stated, "{user}: the end states the charge");
        assert!(
            charged > BUDGET && charged <= BUDGET + EVENT_TOKENS,
            "{user}: {charged}"
        );
        assert!(
            (delivered as u64).div_ceil(4) <= charged,
            "{user}: every delivered token charged: {delivered} bytes, {charged}"
        );
    }
    assert_eq!(g.envoy.metric("streams_cut"), 4);
    assert_eq!(
        g.envoy.metric("streams_reset"),
        0,
        "each upstream ended within the drain"
    );
}

/// An upstream that would stream for minutes is reset at its first chunk after the drain; the
/// client has its clean end by then, and nothing after it.
#[test]
fn an_upstream_that_goes_on_past_the_drain_is_reset() {
    let g = gateway(json!({"stream_drain_ms": 300}));
    let headers = runaway("ann", 1_000_000, 20);
    let body = json!({"model": "m", "stream": true}).to_string();
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm.test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in &headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut conn = TcpStream::connect(("127.0.0.1", g.envoy.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(req.as_bytes()).unwrap();
    // Read until Envoy closes the connection (a reset: no last chunk).
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    let done = text.find("data: [DONE]").expect("the end");
    assert!(
        !text[done..].contains("\"content\""),
        "nothing after the end"
    );
    assert!(!text.ends_with("0\r\n\r\n"), "ended by a reset");
    assert_eq!(g.envoy.metric("streams_cut"), 1);
    assert_eq!(g.envoy.metric("streams_reset"), 1);
    let stats = http::stats(g.envoy.admin, "_with_active_rq");
    assert_eq!(
        stats["cluster.upstream.upstream_cx_destroy_local_with_active_rq"], 1,
        "the upstream connection closed mid-answer: {stats:?}"
    );
    let charged = g.charged("ann", BUDGET);
    assert!(
        charged > BUDGET && charged <= BUDGET + EVENT_TOKENS,
        "{charged}"
    );
}

/// Under `reserve.trim` the watch is on without `stream_cutoff`: an upstream that ignores the
/// granted cap is ended at what was granted, and the budget is spent, not overdrawn past that event.
#[test]
fn an_upstream_that_ignores_a_trimmed_cap_is_ended_at_the_grant() {
    let g = gateway(json!({
        "stream_cutoff": false,
        "reserve": {"tokens": "max_tokens", "trim": true, "min": 20}
    }));
    let headers = runaway("bob", 5000, 1);
    let mut h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    h.push(("content-type", "application/json"));
    let body = json!({"model": "m", "stream": true, "max_tokens": 4000});
    let r = http::send(
        g.envoy.port,
        "POST",
        "/v1/chat/completions",
        &h,
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200);
    let granted: u64 = r
        .header("x-ratelimit-granted-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(granted < BUDGET);
    assert!(r.text().contains("\"finish_reason\":\"length\""));
    let charged = g.charged("bob", BUDGET);
    assert!(
        charged > BUDGET && charged <= BUDGET + EVENT_TOKENS,
        "{charged}"
    );
    assert_eq!(g.envoy.metric("streams_cut"), 1);
}
