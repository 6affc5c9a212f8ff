//! The plugin's response phase in a real Envoy, against the real rate-limit service and the mock
//! LLM: every provider's usage is charged exactly, streaming or not; streams without usage,
//! aborted streams, upstream errors, service outages and 100 MB responses are accounted for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http;
use testkit::service::{self, mock_llm, Service};

const BUDGET: u64 = 1_000_000;

/// A plugin config with one per-user budget; `extra` fields are merged in at the top level.
fn config(extra: Value) -> Value {
    let mut c = json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 1000},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": "1h"}]
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn envoy(config: &Value, service_port: u16, llm: &Service) -> Envoy {
    Envoy::start(
        config,
        &[
            cluster("ratelimit", service_port),
            cluster("upstream", llm.port),
        ],
    )
}

/// Tokens the service has charged `user` so far.
fn spent(service_port: u16, user: &str) -> u64 {
    let q = http::send(
        service_port,
        "GET",
        &format!("/v1/quota?limit=user&value={user}"),
        &[],
        b"",
    )
    .json();
    BUDGET - q["meters"][0]["remaining"].as_u64().unwrap_or(BUDGET)
}

/// Waits until `user` has been charged `want` (reports are asynchronous), then checks it stays.
fn assert_spent(service_port: u16, user: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = spent(service_port, user);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        got = spent(service_port, user);
    }
    assert_eq!(got, want, "tokens charged to {user}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(spent(service_port, user), want, "{user} charged again");
}

struct Call {
    path: &'static str,
    body: Value,
    headers: &'static [(&'static str, &'static str)],
    /// Tokens the mock reports for the request (the charge under `count: total`).
    tokens: u64,
}

/// One request per provider shape, JSON and SSE, with uneven usage and chunking.
fn calls() -> Vec<(&'static str, Call)> {
    let sse_usage =
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}});
    vec![
        (
            "openai-json",
            Call {
                path: "/v1/chat/completions",
                body: json!({"model": "gpt-4o"}),
                headers: &[
                    ("x-mock-prompt-tokens", "11"),
                    ("x-mock-completion-tokens", "31"),
                ],
                tokens: 42,
            },
        ),
        (
            "openai-sse",
            Call {
                path: "/v1/chat/completions",
                body: sse_usage.clone(),
                headers: &[
                    ("x-mock-prompt-tokens", "7"),
                    ("x-mock-completion-tokens", "93"),
                    ("x-mock-chunk-bytes", "7"),
                ],
                tokens: 100,
            },
        ),
        // No include_usage from the client: the plugin asks for it.
        (
            "openai-sse-injected",
            Call {
                path: "/v1/chat/completions",
                body: json!({"model": "gpt-4o", "stream": true}),
                headers: &[
                    ("x-mock-prompt-tokens", "5"),
                    ("x-mock-completion-tokens", "50"),
                ],
                tokens: 55,
            },
        ),
        (
            "openai-sse-explicit-false",
            Call {
                path: "/v1/chat/completions",
                body: json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false}}),
                headers: &[
                    ("x-mock-prompt-tokens", "3"),
                    ("x-mock-completion-tokens", "4"),
                ],
                tokens: 7,
            },
        ),
        (
            "completions-json",
            Call {
                path: "/v1/completions",
                body: json!({"model": "x", "prompt": "hi"}),
                headers: &[
                    ("x-mock-prompt-tokens", "2"),
                    ("x-mock-completion-tokens", "9"),
                ],
                tokens: 11,
            },
        ),
        (
            "embeddings",
            Call {
                path: "/v1/embeddings",
                body: json!({"model": "e", "input": "hi"}),
                headers: &[("x-mock-prompt-tokens", "8")],
                tokens: 8,
            },
        ),
        (
            "responses-json",
            Call {
                path: "/v1/responses",
                body: json!({"model": "gpt-4.1"}),
                headers: &[
                    ("x-mock-prompt-tokens", "37"),
                    ("x-mock-completion-tokens", "11"),
                ],
                tokens: 48,
            },
        ),
        (
            "responses-sse",
            Call {
                path: "/v1/responses",
                body: json!({"model": "gpt-4.1", "stream": true}),
                headers: &[
                    ("x-mock-prompt-tokens", "21"),
                    ("x-mock-completion-tokens", "40"),
                    ("x-mock-chunk-bytes", "3"),
                ],
                tokens: 61,
            },
        ),
        (
            "anthropic-json",
            Call {
                path: "/v1/messages",
                body: json!({"model": "claude"}),
                headers: &[
                    ("x-mock-prompt-tokens", "120"),
                    ("x-mock-cache-read-tokens", "100"),
                    ("x-mock-completion-tokens", "9"),
                ],
                tokens: 129,
            },
        ),
        (
            "anthropic-sse",
            Call {
                path: "/v1/messages",
                body: json!({"model": "claude", "stream": true}),
                headers: &[
                    ("x-mock-prompt-tokens", "25"),
                    ("x-mock-cache-read-tokens", "10"),
                    ("x-mock-completion-tokens", "64"),
                    ("x-mock-chunk-bytes", "1"),
                ],
                tokens: 89,
            },
        ),
        (
            "gemini-json",
            Call {
                path: "/v1beta/models/gemini-2.5-flash:generateContent",
                body: json!({"contents": []}),
                headers: &[
                    ("x-mock-prompt-tokens", "9"),
                    ("x-mock-completion-tokens", "24"),
                ],
                tokens: 33,
            },
        ),
        (
            "gemini-sse",
            Call {
                path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                body: json!({"contents": []}),
                headers: &[
                    ("x-mock-prompt-tokens", "12"),
                    ("x-mock-completion-tokens", "70"),
                    ("x-mock-chunk-bytes", "5"),
                ],
                tokens: 82,
            },
        ),
        (
            "gemini-array",
            Call {
                path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                body: json!({"contents": []}),
                headers: &[
                    ("x-mock-prompt-tokens", "4"),
                    ("x-mock-completion-tokens", "17"),
                ],
                tokens: 21,
            },
        ),
        (
            "dashscope-json",
            Call {
                path: "/api/v1/services/aigc/text-generation/generation",
                body: json!({"model": "qwen-plus"}),
                headers: &[
                    ("x-mock-prompt-tokens", "14"),
                    ("x-mock-completion-tokens", "17"),
                ],
                tokens: 31,
            },
        ),
        (
            "dashscope-sse",
            Call {
                path: "/api/v1/services/aigc/text-generation/generation",
                body: json!({"model": "qwen-plus"}),
                headers: &[
                    ("x-dashscope-sse", "enable"),
                    ("x-mock-prompt-tokens", "22"),
                    ("x-mock-completion-tokens", "18"),
                ],
                tokens: 40,
            },
        ),
    ]
}

fn call(port: u16, user: &str, c: &Call) -> http::Response {
    let mut headers = vec![("x-user", user)];
    headers.extend_from_slice(c.headers);
    http::post_json(port, c.path, &headers, &c.body)
}

#[test]
fn every_provider_is_charged_exactly_streaming_or_not() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = envoy(&config(json!({})), svc.port, &llm);
    let calls = calls();
    const ROUNDS: u64 = 3;
    for _ in 0..ROUNDS {
        for (user, c) in &calls {
            let r = call(e.port, user, c);
            assert_eq!(r.status, 200, "{user}: {}", r.text());
            if c.body["stream"] == true && c.path.ends_with("/chat/completions") {
                // The client still gets a complete, well-formed stream.
                assert!(
                    r.text().ends_with("data: [DONE]\n\n"),
                    "{user}: {}",
                    r.text()
                );
            }
        }
    }
    for (user, c) in &calls {
        assert_spent(svc.port, user, ROUNDS * c.tokens);
    }
    let n = ROUNDS * calls.len() as u64;
    assert_eq!(e.metric("usage.reported"), n);
    assert_eq!(e.metric("reports.sent"), n);
    assert_eq!(
        e.metric("tokens_reported"),
        ROUNDS * calls.iter().map(|(_, c)| c.tokens).sum::<u64>()
    );
    assert_eq!(e.metric("stream_usage_injected"), 2 * ROUNDS);
    assert_eq!(e.metric("usage.estimated") + e.metric("reports.dropped"), 0);
}

#[test]
fn counts_weights_and_missing_usage() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let body = json!({"model": "m"});
    let request_bytes = body.to_string().len() as u64;
    // Weighted, and an estimate when the upstream reports nothing.
    let e = envoy(
        &config(
            json!({"usage": {"count": {"prompt": 1, "completion": 4}, "on_missing": "estimate"}}),
        ),
        svc.port,
        &llm,
    );
    let ask = |user: &str, headers: &[(&str, &str)]| {
        let mut h = vec![("x-user", user)];
        h.extend_from_slice(headers);
        let r = http::post_json(e.port, "/v1/chat/completions", &h, &body);
        assert_eq!(r.status, 200);
    };
    ask(
        "weighted",
        &[
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "5"),
        ],
    );
    assert_spent(svc.port, "weighted", 10 + 4 * 5);
    ask(
        "estimated",
        &[("x-mock-no-usage", "1"), ("x-mock-text-bytes", "401")],
    );
    assert_spent(
        svc.port,
        "estimated",
        request_bytes.div_ceil(4) + 4 * 401u64.div_ceil(4),
    );
    assert_eq!(e.metric("usage.estimated"), 1);
    drop(e);

    let e = envoy(
        &config(
            json!({"usage": {"count": "completion", "on_missing": "zero"}, "inject_stream_usage": false}),
        ),
        svc.port,
        &llm,
    );
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "zero"), ("x-mock-no-usage", "1")],
        &json!({"stream": true}),
    );
    assert_eq!(r.status, 200);
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "zero"), ("x-mock-completion-tokens", "6")],
        &json!({}),
    );
    assert_eq!(r.status, 200);
    assert_spent(svc.port, "zero", 6);
    assert_eq!(e.metric("usage.missing"), 1);
    assert_eq!(e.metric("stream_usage_injected"), 0);
}

#[test]
fn upstream_errors_refund_the_reserve() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = envoy(
        &config(json!({"reserve": {"tokens": "max_tokens"}})),
        svc.port,
        &llm,
    );
    let body = json!({"model": "m", "max_tokens": 500});
    let failed = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "u"), ("x-mock-status", "500")],
        &body,
    );
    assert_eq!(failed.status, 500);
    let ok = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[
            ("x-user", "u"),
            ("x-mock-prompt-tokens", "20"),
            ("x-mock-completion-tokens", "30"),
        ],
        &body,
    );
    assert_eq!(ok.status, 200);
    // Each reserve was taken at admission: the failed request gets all of it back, the other
    // one is charged what it used.
    assert_spent(svc.port, "u", 50);
    assert_eq!(e.metric("usage.upstream_error"), 1);
}

#[test]
fn a_client_that_disconnects_mid_stream_is_charged_what_it_saw() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = envoy(
        &config(json!({"usage": {"on_missing": "zero"}})),
        svc.port,
        &llm,
    );
    let body = json!({"model": "m", "stream": true}).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", e.port)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm.test\r\nx-user: quitter\r\ncontent-type: application/json\r\n\
         x-mock-text-bytes: 4000\r\nx-mock-piece-bytes: 100\r\nx-mock-delay-ms: 50\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(9).filter(|w| w == b"\"content\"").count() < 5 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    // Five or so pieces of 100 bytes were delivered out of 40, and no usage: charged the
    // estimate of what was seen (25 tokens a piece) plus the prompt's, even under `zero`.
    let deadline = Instant::now() + Duration::from_secs(10);
    while spent(svc.port, "quitter") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let charged = spent(svc.port, "quitter");
    let prompt = (body.len() as u64).div_ceil(4);
    assert!(
        (prompt + 5 * 25..prompt + 40 * 25).contains(&charged),
        "charged {charged}"
    );
    assert_eq!(e.metric("usage.estimated"), 1);
}

#[test]
fn reports_survive_a_service_outage() {
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut svc = Service::start_at(service::binary(), &listen, &[], &[]);
    let llm = mock_llm();
    // Checks fail while the service is down; `allow` lets requests through and their usage is
    // still owed.
    let e = envoy(
        &config(
            json!({"service": {"cluster": "ratelimit", "timeout_ms": 300, "failure_mode": "allow"}}),
        ),
        port,
        &llm,
    );
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "o"),
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-completion-tokens", "20"),
            ],
            &json!({}),
        )
    };
    assert_eq!(ask().status, 200);
    assert_spent(port, "o", 30);
    assert!(svc.terminate().success());
    for _ in 0..5 {
        assert_eq!(ask().status, 200);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(e.metric("reports.retried") > 0, "{:?}", e.metrics());
    // The memory store starts empty: what it holds after the restart is what was queued.
    let _svc = Service::start_at(service::binary(), &listen, &[], &[]);
    assert_spent(port, "o", 5 * 30);
    assert_eq!(e.metric("reports.sent"), 6);
    assert_eq!(e.metric("reports.failed") + e.metric("reports.dropped"), 0);
    assert_eq!(e.metric("report_queue"), 0);
}

#[test]
fn a_100_mb_stream_passes_through_without_the_plugin_growing() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = envoy(&config(json!({})), svc.port, &llm);
    let ask = |text_bytes: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "big"),
                ("x-mock-text-bytes", text_bytes),
                ("x-mock-piece-bytes", "16384"),
                ("x-mock-completion-tokens", "1000"),
                ("x-mock-prompt-tokens", "1"),
            ],
            &json!({"stream": true}),
        )
    };
    // Warm up: the VM's memory after one ordinary stream.
    assert_eq!(ask("100000").status, 200);
    assert_spent(svc.port, "big", 1001);
    let before = e.metric("vm_memory_bytes");
    assert!(before > 0);
    let r = ask("100000000");
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 100_000_000);
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    assert_spent(svc.port, "big", 2 * 1001);
    let after = e.metric("vm_memory_bytes");
    assert!(
        after <= before + 1024 * 1024,
        "VM memory grew from {before} to {after} bytes"
    );
}

#[test]
fn asm_protocol_reports_one_update_per_request() {
    let svc = Service::start(&[], &[("RATE_LIMIT_CONFIG", testkit::ASM_EXAMPLE_RULES)]);
    let llm = mock_llm();
    let e = envoy(
        &json!({"service": {"cluster": "ratelimit", "protocol": "asm"},
                "limits": [{"name": "user-type", "key": "{{request.headers.user-type}}"}]}),
        svc.port,
        &llm,
    );
    // regular-user: ASM's documented bucket of 200. 2 × 120 tokens: the first is admitted
    // with a full bucket, the second with 80 left, the third finds it in debt.
    let ask = || {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("user-type", "regular-user"),
                ("x-mock-prompt-tokens", "20"),
                ("x-mock-completion-tokens", "100"),
            ],
            &json!({}),
        )
        .status
    };
    assert_eq!(ask(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.metric("reports.sent") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ask(), 200);
    while e.metric("reports.sent") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ask(), 429);
    assert_eq!(e.metric("tokens_reported"), 240);
}

/// The plugin asked for usage in a stream the client did not ask it of: the client receives
/// the stream without the usage-only chunk (`"choices": []`) and without `"usage": null`, at
/// any chunking, and the request is still charged from that usage. A client that asked for it
/// gets it.
#[test]
fn usage_the_client_did_not_ask_for_is_taken_out_of_its_stream() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let e = envoy(&config(json!({})), svc.port, &llm);
    for (user, piece) in [("whole", "4096"), ("pieces", "5")] {
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", user),
                ("x-mock-prompt-tokens", "5"),
                ("x-mock-completion-tokens", "50"),
                ("x-mock-chunk-bytes", piece),
            ],
            &json!({"model": "gpt-4o", "stream": true}),
        );
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(
            text.contains("\"content\"") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert!(!text.contains("\"choices\":[]"), "{user}: {text}");
        assert!(!text.contains("\"usage\""), "{user}: {text}");
        assert_spent(svc.port, user, 55);
    }
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[
            ("x-user", "asked"),
            ("x-mock-prompt-tokens", "5"),
            ("x-mock-completion-tokens", "50"),
        ],
        &json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert!(r.text().contains("\"choices\":[]"), "asked for: kept");
    assert_spent(svc.port, "asked", 55);
}

/// What providers bill beyond the top-level figures: Anthropic's `usage.iterations` (every step
/// of a compacted or advised answer; the top level is the last step's only) and Gemini's
/// `toolUsePromptTokenCount` (in its total, not in its prompt count).
#[test]
fn every_billed_step_and_tool_prompt_is_charged() {
    let svc = Service::start(&[], &[]);
    let upstream = http::Server::start(|req| {
        if req.path.contains("generateContent") {
            return http::json_reply(
                200,
                json!({"candidates": [{"content": {"parts": [{"text": "ok"}]}}],
                       "usageMetadata": {"promptTokenCount": 100, "toolUsePromptTokenCount": 4610,
                                          "candidatesTokenCount": 20, "totalTokenCount": 4730},
                       "modelVersion": "gemini-2.5-flash"}),
            );
        }
        let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-opus-4", "content": [], "usage": {"input_tokens": 23000, "output_tokens": 1}}});
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 23000, "output_tokens": 1000,
                      "iterations": [{"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
                                     {"type": "message", "input_tokens": 23000, "output_tokens": 1000}]}});
        http::reply(
            200,
            "text/event-stream",
            format!("event: message_start\ndata: {start}\n\nevent: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"Hi\"}}}}\n\nevent: message_delta\ndata: {delta}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"),
        )
    });
    // Prompt tokens are what both miss: charge them alone.
    let e = Envoy::start(
        &config(json!({"usage": {"count": "prompt"}})),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", upstream.port),
        ],
    );
    let r = http::post_json(
        e.port,
        "/v1/messages",
        &[("x-user", "compacted")],
        &json!({"model": "claude-opus-4", "stream": true, "max_tokens": 4000}),
    );
    assert_eq!(r.status, 200);
    // 180,000 + 23,000 input: the previous build charged 23,000.
    assert_spent(svc.port, "compacted", 203_000);
    let r = http::post_json(
        e.port,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        &[("x-user", "tools")],
        &json!({"contents": []}),
    );
    assert_eq!(r.status, 200);
    // 100 + 4,610 tool-use prompt tokens: the previous build charged 100.
    assert_spent(svc.port, "tools", 4710);
}
