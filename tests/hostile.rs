//! Requests built to break the gateway or to pick their own price, end to end in a real Envoy:
//! each is served or refused safely, and charged what it cost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, raw_post, send_raw, Behaviour, Response, Server};
use testkit::service::{mock_llm, Service};

/// Header values that are not UTF-8 (HTTP's `obs-text`) on every header the plugin reads. The
/// proxy-wasm SDK's string getters panic on them, which traps the VM: with Envoy's default
/// fail-closed policy every later request on every route is then refused. Here they are data:
/// served, keyed by their bytes, held to their budget, and the next requests are served normally.
#[test]
fn header_bytes_that_are_not_utf8_neither_crash_nor_escape_the_budget() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "consumer_header": "x-consumer",
        "limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 30, "window": "1h"},
            {"name": "key", "key": "{{request.headers.authorization}}{{request.query.k}}{{request.cookies.sid}}{{consumer}}", "tokens": 1000000, "window": "1h"}
        ]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let tokens: &[(&str, &[u8])] = &[
        ("x-mock-prompt-tokens", b"10"),
        ("x-mock-completion-tokens", b"10"),
    ];
    let hostile = |user: &[u8]| -> Response {
        let mut headers = vec![
            ("x-user", user),
            ("x-junk", b"\xff\xfe".as_slice()),
            ("authorization", b"Bearer sk-\xc3\x28"),
            ("cookie", b"a=\xff; sid=s\xfe"),
            ("x-consumer", b"team-\x80"),
        ];
        headers.extend_from_slice(tokens);
        send_raw(
            e.port,
            &raw_post(b"/v1/chat/completions?x=%ff&k=%fe", &headers, &json!({})),
        )
    };
    let junk_user = b"ann\xff\xfe";
    assert_eq!(hostile(junk_user).status, 200);
    // Keyed by its bytes: 20 of its 30 tokens spent.
    svc.await_remaining("user", "\0ann\\xff\\xfe", 10);
    assert_eq!(
        hostile(junk_user).status,
        200,
        "10 tokens left admit one more"
    );
    svc.await_remaining("user", "\0ann\\xff\\xfe", 0);
    assert_eq!(
        hostile(junk_user).status,
        429,
        "a spent budget admits nobody"
    );
    // Other bytes, another budget; and ordinary requests go on being served and counted.
    assert_eq!(hostile(b"bob\x80").status, 200);
    for _ in 0..3 {
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "carol"),
                ("x-mock-prompt-tokens", "1"),
                ("x-mock-completion-tokens", "1"),
            ],
            &json!({}),
        );
        assert_eq!(r.status, 200);
    }
    svc.await_remaining("user", "carol", 24);
    assert!(
        !e.log().contains("panicked"),
        "the VM panicked:\n{}",
        e.log()
    );
}

/// An upstream whose response headers are not UTF-8: the answer reaches the client, its usage
/// is charged, and the VM lives on.
#[test]
fn response_header_bytes_that_are_not_utf8_are_read_safely() {
    let svc = Service::start(&[], &[]);
    let body = json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        .to_string();
    let upstream = Server::start(move |_| {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(b"content-type: application/json\xff\r\n");
        answer.extend_from_slice(b"content-encoding: \xfe\r\nx-odd: \xc3\x28\r\n\r\n");
        answer.extend_from_slice(body.as_bytes());
        Behaviour::Raw(answer)
    });
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", upstream.port),
        ],
    );
    for _ in 0..2 {
        let r = http::try_send_to(
            &format!("127.0.0.1:{}", e.port),
            "POST",
            "/v1/chat/completions",
            &[("x-user", "ann")],
            b"{}",
        )
        .unwrap_or_else(|err| panic!("{err}: {}", e.log()));
        assert_eq!(r.status, 200);
    }
    // The encoding is not one the plugin can read, so usage is missing: the estimate is
    // charged, at least one token per request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while svc.remaining("user", "ann").unwrap_or(1000) > 998 {
        assert!(std::time::Instant::now() < deadline, "never charged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!e.log().contains("panicked"), "{}", e.log());
}

/// An upstream that answers as the Responses API does: the model and usage where the API puts
/// them, and the client's `metadata` echoed back (after both), as JSON or as a stream.
fn echoing_upstream() -> Server {
    Server::start(|req| {
        let asked = req.json();
        let metadata = asked["metadata"].to_string();
        // Written by hand: the order of the fields is the point (serde_json sorts them).
        let response = format!(
            r#"{{"object":"response","model":"gpt-4o-2024-08-06","status":"completed","usage":{{"input_tokens":1000,"output_tokens":500,"total_tokens":1500}},"metadata":{metadata}}}"#
        );
        if asked["stream"] == true {
            let created = format!(
                r#"{{"type":"response.created","response":{{"model":"gpt-4o-2024-08-06","metadata":{metadata}}}}}"#
            );
            let done = format!(r#"{{"type":"response.completed","response":{response}}}"#);
            http::reply(
                200,
                "text/event-stream",
                format!("event: response.created\ndata: {created}\n\nevent: response.completed\ndata: {done}\n\n"),
            )
        } else {
            http::reply(200, "application/json", response)
        }
    })
}

/// The price comes from where the API names the model, never from an object the client filled:
/// `"metadata": {"model": "gpt-4o-mini"}` on a gpt-4o request is still priced as gpt-4o, as JSON
/// and as a stream, and the budget admits what it pays for.
#[test]
fn a_client_cannot_choose_its_price_through_echoed_metadata() {
    let svc = Service::start(&[], &[]);
    let up = echoing_upstream();
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "prices": {"currency": "USD", "models": [
            {"model": "gpt-4o-mini*", "input": "0.15", "output": "0.60"},
            {"model": "gpt-4o*", "input": "5.00", "output": "15.00"}
        ]},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "unit": "cost", "budget": "0.05", "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    for (user, stream) in [("json", false), ("sse", true)] {
        let ask = || {
            http::post_json(
                e.port,
                "/v1/responses",
                &[("x-user", user)],
                &json!({"model": "gpt-4o", "input": "hi", "stream": stream,
                        "metadata": {"model": "gpt-4o-mini", "modelVersion": "gpt-4o-mini"}}),
            )
        };
        // 1,000 input and 500 output tokens at gpt-4o's price: 0.0125 USD, four per budget.
        for spent in 1..=4u64 {
            assert_eq!(ask().status, 200, "{user} request {spent}");
            svc.await_remaining("user", user, 50_000 - spent * 12_500);
        }
        assert_eq!(ask().status, 429, "{user}: the budget is spent");
    }
}
