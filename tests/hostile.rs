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

/// An upstream as lenient as Python's `json`: it streams whenever the body says `"stream":
/// true` (whatever else is in it, `NaN` included), sends usage only when asked
/// (`"include_usage":true`), and otherwise uses `tokens` completion tokens whatever the cap.
fn lenient_upstream(tokens: u64) -> Server {
    Server::start(move |req| {
        let body = String::from_utf8_lossy(&req.body).replace(' ', "");
        let usage =
            json!({"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10});
        if body.contains("\"stream\":true") {
            let mut sse = String::new();
            for _ in 0..tokens / 10 {
                sse.push_str(&format!(
                    "data: {}\n\n",
                    json!({"choices": [{"delta": {"content": "0123456789".repeat(4)}}]})
                ));
            }
            if body.contains("\"include_usage\":true") {
                sse.push_str(&format!(
                    "data: {}\n\n",
                    json!({"choices": [], "usage": usage})
                ));
            }
            sse.push_str("data: [DONE]\n\n");
            http::reply(200, "text/event-stream", sse)
        } else {
            http::json_reply(200, json!({"choices": [], "usage": usage}))
        }
    })
}

/// Sends `body` (raw bytes) as user `user` to `path`.
fn post(port: u16, path: &str, user: &str, body: &[u8]) -> Response {
    http::send(
        port,
        "POST",
        path,
        &[("content-type", "application/json"), ("x-user", user)],
        body,
    )
}

/// A body that Python's `json` accepts and serde refuses (`NaN`) used to be "unreadable": no
/// usage was asked for, and with `on_missing: zero` every stream was free. It is read as the
/// upstream reads it now: usage is asked for and charged, and the budget holds.
#[test]
fn a_body_only_lenient_parsers_accept_is_read_as_they_read_it() {
    let svc = Service::start(&[], &[]);
    let up = lenient_upstream(200);
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "usage": {"on_missing": "zero"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let bodies: [&[u8]; 3] = [
        br#"{"model":"m","temperature":NaN,"stream":true,"messages":[]}"#,
        b"\xef\xbb\xbf{\"model\":\"m\",\"stream\":true,\"top_p\":Infinity}",
        br#"{"model":"m","user":"\ud800","stream":true}"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        let user = format!("u{i}");
        let mut served = 0;
        for _ in 0..8 {
            let r = post(e.port, "/v1/chat/completions", &user, body);
            if r.status == 200 {
                served += 1;
                svc.await_remaining("user", &user, 1000u64.saturating_sub(210 * served));
            }
        }
        // 1,000 tokens pay for four of 210; the fifth is admitted on the 160 left.
        assert_eq!(served, 5, "body {i}");
    }
    assert_eq!(e.metric("request_body_unreadable"), 0);
    // Every request was asked to stream its usage, the refused ones included.
    assert_eq!(e.metric("stream_usage_injected"), 24);
}

/// A body the plugin cannot read at all is never free: without usage it is charged the
/// estimate, whatever `on_missing` says, and it reserves `reserve.default`.
#[test]
fn an_unreadable_body_is_charged_at_least_the_estimate() {
    let svc = Service::start(&[], &[]);
    let up = lenient_upstream(200);
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "usage": {"on_missing": "zero"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 100000, "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    // Not JSON to the plugin (trailing bytes); streamed by the upstream, without usage.
    let r = post(
        e.port,
        "/v1/chat/completions",
        "ann",
        br#"{"stream":true} trailing"#,
    );
    assert_eq!(r.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // 20 events of 40 bytes of text: about 200 tokens by the estimate.
    while svc.remaining("user", "ann").unwrap_or(100_000) > 100_000 - 150 {
        assert!(std::time::Instant::now() < deadline, "charged nothing");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(e.metric("request_body_unreadable"), 1);
}

/// With reservations, a request that states no cap reserves `reserve.default`, and one that
/// asks for several choices reserves for each: neither slips past a budget another request
/// holds. `reserve.write_cap` writes the reservation into the request, so the upstream cannot
/// produce more than was reserved.
#[test]
fn no_request_opts_out_of_its_reservation() {
    let svc = Service::start(&[], &[]);
    // Each answer takes a second: the requests overlap.
    let slow = Server::start(|req| {
        let asked = req.json();
        let cap = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|f| asked[f].as_u64())
            .unwrap_or(500);
        let n = asked["n"].as_u64().unwrap_or(1);
        let used = cap.min(500) * n;
        Behaviour::Delay(
            std::time::Duration::from_millis(1000),
            Box::new(http::json_reply(
                200,
                json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": used, "total_tokens": used}}),
            )),
        )
    });
    let c = |write_cap: bool| {
        let mut c = json!({
            "service": {"cluster": "ratelimit"},
            "reserve": {"tokens": "max_tokens"},
            "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
        });
        if write_cap {
            c["reserve"]["write_cap"] = json!(true);
        }
        c
    };
    let e = Envoy::start(
        &c(false),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", slow.port),
        ],
    );
    let concurrently = |user: &str, body: serde_json::Value, k: usize| -> usize {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..k)
                .map(|_| {
                    let body = body.clone();
                    s.spawn(move || {
                        post(
                            e.port,
                            "/v1/chat/completions",
                            user,
                            body.to_string().as_bytes(),
                        )
                        .status
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .filter(|status| *status == 200)
                .count()
        })
    };
    // Twenty requests of 500 tokens without a cap: one holds the whole budget at a time.
    let served = concurrently("nocap", json!({"model": "m"}), 20);
    assert!(served <= 2, "{served} served of 500 tokens each on 1,000");
    // Three choices of 200: 600 reserved each, so two cannot be in flight at once.
    let served = concurrently(
        "choices",
        json!({"model": "m", "max_tokens": 200, "n": 3}),
        2,
    );
    assert_eq!(served, 1, "600 + 600 > 1,000");
    svc.await_remaining("user", "choices", 400);
    drop(e);

    let e = Envoy::start(
        &c(true),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", slow.port),
        ],
    );
    let r = post(
        e.port,
        "/v1/chat/completions",
        "capped",
        br#"{"model":"m"}"#,
    );
    assert_eq!(r.status, 200);
    let r = post(
        e.port,
        "/v1/messages",
        "capped2",
        br#"{"model":"m","max_tokens":5000}"#,
    );
    assert_eq!(r.status, 200);
    let seen: Vec<serde_json::Value> = slow
        .requests()
        .iter()
        .rev()
        .take(2)
        .map(|r| r.json())
        .collect();
    assert_eq!(
        seen[1]["max_completion_tokens"], 1000,
        "the default, within the budget"
    );
    assert_eq!(
        seen[0]["max_tokens"], 1000,
        "5,000 lowered to what was reserved"
    );
    assert_eq!(e.metric("request_caps_written"), 2);
}

/// Bodies of 16 MiB with repeated keys and `"stream_options": null` (which a document-tree
/// parser turned into hundreds of MiB of Wasm memory that never shrinks): read and rewritten in
/// memory bounded by a small multiple of the body, request after request.
#[test]
fn large_bodies_with_repeated_keys_keep_the_vm_small() {
    let svc = Service::start(&[], &[]);
    let up = Server::start(|req| {
        // The upstream reads the last `stream_options`: the plugin's.
        let streams = req.json()["stream_options"]["include_usage"] == true;
        http::json_reply(
            200,
            json!({"streamed": streams, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
        )
    });
    let mut c = json!({
        "service": {"cluster": "ratelimit"},
        "max_request_body_bytes": 32 << 20,
        "limits": [{"name": "model", "key": "{{llm.model}}", "tokens": 1000000, "window": "1h"}]
    });
    c["reserve"] = json!({"tokens": "max_tokens"});
    let mut config = testkit::envoy::bootstrap(
        &c.to_string(),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
        &testkit::envoy::plugin_wasm(),
        "127.0.0.1",
    );
    // Envoy holds the whole request while the plugin reads it.
    config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] =
        json!(64 << 20);
    let e = Envoy::try_start_bootstrap(&config).unwrap_or_else(|log| panic!("{log}"));
    let ask = |body: &[u8]| post(e.port, "/v1/chat/completions", "big", body);
    assert_eq!(ask(br#"{"model":"m","stream":true}"#).status, 200);
    let before = e.metric("vm_memory_bytes");
    let mib = 1 << 20;
    let filler = "x".repeat(16 * mib);
    for i in 0..3 {
        let body = format!(
            r#"{{"model":"a","stream":true,"stream_options":null,"messages":[{{"role":"user","content":"{filler}"}}],"model":"m{i}","stream_options":null,"max_tokens":5,"max_tokens":7}}"#
        );
        let r = ask(body.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["streamed"],
            true,
            "usage asked for in the last stream_options"
        );
        svc.await_remaining("model", &format!("m{i}"), 1_000_000 - 2);
    }
    let after = e.metric("vm_memory_bytes");
    // The body, its rewritten copy and change: never a document of it.
    assert!(
        after <= before + 40 * mib as u64,
        "VM memory grew by {} MiB for 16 MiB bodies",
        (after - before) >> 20
    );
}

/// Every spelling of a path that nginx or uvicorn serve as one route is that route to the
/// plugin too, whatever Envoy's normalisation settings (the test Envoy has none): a spent
/// budget on `/v1/chat/` is spent for all of them.
#[test]
fn another_spelling_of_the_path_is_the_same_route() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "matches": [{"path": {"prefix": "/v1/chat/"}}],
        "limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 20, "window": "1h"},
            {"name": "path", "key": "{{request.path}}", "tokens": 1000000, "window": "1h"}
        ]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let ask = |path: &str| {
        http::post_json(
            e.port,
            path,
            &[
                ("x-user", "ann"),
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-completion-tokens", "10"),
            ],
            &json!({"model": "m"}),
        )
        .status
    };
    assert_eq!(ask("/v1/chat/completions"), 200);
    svc.await_remaining("user", "ann", 0);
    for spelling in [
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/%76%31/chat/completions",
        "/v1/chat%2Fcompletions",
    ] {
        assert_eq!(ask(spelling), 429, "{spelling}");
    }
    // Keys on the path see the one spelling too.
    assert_eq!(
        svc.remaining("path", "/v1/chat/completions"),
        Some(1_000_000 - 20)
    );
    assert_eq!(e.metric("requests_matched"), 7);
}

/// A client that times out before the response begins: the upstream goes on generating and
/// bills it, so the reservation stands (it used to be refunded: the request was free).
#[test]
fn disconnecting_before_the_response_is_not_free() {
    use std::io::Write;
    let svc = Service::start(&[], &[]);
    let slow = Server::start(|_| {
        Behaviour::Delay(
            std::time::Duration::from_secs(2),
            Box::new(http::json_reply(
                200,
                json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
            )),
        )
    });
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "reserve": {"tokens": "max_tokens"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", slow.port),
        ],
    );
    let body = json!({"model": "m", "max_tokens": 100}).to_string();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", e.port)).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm.test\r\nx-user: ann\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Admitted (100 reserved), then the client gives up while the upstream works.
    svc.await_remaining("user", "ann", 900);
    drop(conn);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Settled (the previous plugin counted it an upstream error, and refunded it).
    while e.metric("usage.abandoned") + e.metric("usage.upstream_error") < 1 {
        assert!(std::time::Instant::now() < deadline, "never settled");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        svc.remaining("user", "ann"),
        Some(900),
        "the reservation stands"
    );
}

/// Key sources read as every upstream might read them: a repeated query parameter or cookie is
/// counted against each of its values (upstreams disagree on first or last), and every base64
/// spelling of one Basic credential is one user.
#[test]
fn repeating_or_respelling_a_key_source_is_not_a_fresh_budget() {
    let (svc, llm) = (Service::start(&[], &[]), mock_llm());
    let c = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [
            {"name": "apikey", "key": "{{request.query.apikey}}", "tokens": 20, "window": "1h"},
            {"name": "session", "key": "{{request.cookies.sid}}", "tokens": 20, "window": "1h"},
            {"name": "basic", "key": "{{request.headers.authorization}}", "tokens": 20, "window": "1h"}
        ]
    });
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let ask = |path: &str, headers: &[(&str, &str)]| {
        let mut h = vec![
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "10"),
        ];
        h.extend_from_slice(headers);
        http::post_json(e.port, path, &h, &json!({})).status
    };
    assert_eq!(ask("/v1/chat/completions?apikey=real", &[]), 200);
    svc.await_remaining("apikey", "real", 0);
    for path in [
        "/v1/chat/completions?apikey=fresh1&apikey=real",
        "/v1/chat/completions?apikey=real&apikey=fresh2",
        // Padded past the values counted: the last is always among them.
        "/v1/chat/completions?apikey=j1&apikey=j2&apikey=j3&apikey=j4&apikey=j5&apikey=real",
    ] {
        assert_eq!(ask(path, &[]), 429, "{path}");
    }
    assert_eq!(ask("/v1/chat/completions", &[("cookie", "sid=mine")]), 200);
    svc.await_remaining("session", "mine", 0);
    assert_eq!(
        ask("/v1/chat/completions", &[("cookie", "sid=fresh; sid=mine")]),
        429
    );
    // alice:secret, then other spellings and passwords of alice.
    assert_eq!(
        ask(
            "/v1/chat/completions",
            &[("authorization", "Basic YWxpY2U6c2VjcmV0")]
        ),
        200
    );
    svc.await_remaining("basic", "Basic alice", 0);
    for spelling in [
        "basic YWxpY2U6c2VjcmV0==",
        "Basic YWxp Y2U6c2VjcmV0",
        "Basic YWxpY2U6b3RoZXI=",
    ] {
        assert_eq!(
            ask("/v1/chat/completions", &[("authorization", spelling)]),
            429,
            "{spelling}"
        );
    }
}

/// A service that requires its API key (`--api-key`): the plugin's `service.api_key` is sent on
/// every check and report (v1 and asm), so requests are served and charged; a plugin without
/// the key is refused by the service, and a refused check is never failed open.
#[test]
fn the_plugin_sends_the_services_api_key() {
    const KEY: &str = "plugin-key-0123456789";
    let svc = Service::start(&["--api-key", KEY], &[]);
    let llm = mock_llm();
    let remaining = |limit: &str, value: &str| {
        let r = http::send(
            svc.port,
            "GET",
            &format!("/v1/quota?limit={limit}&value={value}"),
            &[("authorization", &format!("Bearer {KEY}"))],
            b"",
        );
        r.json()["meters"][0]["remaining"].as_u64()
    };
    let ask = |e: &Envoy| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[
                ("x-user", "ann"),
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-completion-tokens", "10"),
            ],
            &json!({}),
        )
        .status
    };
    let with_key = json!({
        "service": {"cluster": "ratelimit", "api_key": KEY, "failure_mode": "allow"},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
    });
    let e = Envoy::start(
        &with_key,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(&e), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while remaining("user", "ann") != Some(980) {
        assert!(
            std::time::Instant::now() < deadline,
            "the report never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(e);
    // Without the key: refused (401 is a refusal, not an outage: never failed open).
    let mut without = with_key.clone();
    without["service"]
        .as_object_mut()
        .unwrap()
        .remove("api_key");
    let e = Envoy::start(
        &without,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(&e), 503);
    assert_eq!(e.metric("failure_mode_allowed"), 0);
    drop(e);
    // The ASM protocol carries it too.
    let asm = json!({
        "service": {"cluster": "ratelimit", "api_key": KEY, "protocol": "asm"},
        "limits": [{"name": "asm-user", "key": "{{request.headers.x-user}}"}]
    });
    let e = Envoy::start(
        &asm,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    assert_eq!(ask(&e), 200);
    assert_eq!(
        e.metric("checks_allowed"),
        1,
        "answered by the service, not failed open"
    );
}
