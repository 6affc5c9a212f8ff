//! The plugin's request phase in a real Envoy: allow, deny, keys, failure modes, metrics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Server};

fn upstream() -> Server {
    Server::start(|_| {
        json_reply(
            200,
            json!({"id": "chatcmpl-1", "usage": {"total_tokens": 3}}),
        )
    })
}

fn allow_all() -> Server {
    Server::start(|req| {
        let limits: Vec<Value> = req.json()["descriptors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|d| json!({"limit": d["limit"], "value": d["value"], "tokens": 100, "window_s": 60, "remaining": 90, "reset_ms": 30000}))
            .collect();
        json_reply(
            200,
            json!({"allowed": true, "limits": limits, "retry_after_ms": 0, "denied_by": null}),
        )
    })
}

fn plugin(limits: Value) -> Value {
    json!({"service": {"cluster": "ratelimit", "timeout_ms": 300}, "limits": limits})
}

fn envoy(config: &Value, service: &Server, upstream: &Server) -> Envoy {
    Envoy::start(
        config,
        &[
            cluster("ratelimit", service.port),
            cluster("upstream", upstream.port),
        ],
    )
}

#[test]
fn allowed_request_reaches_upstream_with_quota_headers() {
    let (svc, up) = (allow_all(), upstream());
    let e = envoy(
        &plugin(
            json!([{"name": "per-user", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1m"}]),
        ),
        &svc,
        &up,
    );
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("x-user", "alice")],
        &json!({"model": "m"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("90"));
    assert_eq!(r.header("x-ratelimit-reset-tokens"), Some("30s"));
    let checks = svc.checks();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].method, "POST");
    assert_eq!(checks[0].path, "/v1/check");
    assert_eq!(
        checks[0].json(),
        json!({"descriptors": [{"limit": "per-user", "value": "alice", "rates": [{"tokens": 100, "window_s": 60}]}], "reserve": 0})
    );
    assert_eq!(up.requests().len(), 1);
    assert_eq!(e.metric("requests_matched"), 1);
    assert_eq!(e.metric("checks_allowed"), 1);
}

fn deny_all() -> Server {
    Server::start(|req| {
        let d = &req.json()["descriptors"][0];
        json_reply(
            200,
            json!({
                "allowed": false,
                "limits": [{"limit": d["limit"], "value": d["value"], "tokens": 10, "window_s": 60, "remaining": 0, "reset_ms": 42000}],
                "retry_after_ms": 41500,
                "denied_by": d["limit"]
            }),
        )
    })
}

#[test]
fn denied_request_gets_an_openai_429() {
    let (svc, up) = (deny_all(), upstream());
    let e = envoy(
        &plugin(
            json!([{"name": "per-key", "key": "{{request.headers.authorization}}", "tokens": 10, "window": "1m"}]),
        ),
        &svc,
        &up,
    );
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("authorization", "Bearer k1")],
        &json!({"model": "m"}),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("retry-after"), Some("42"));
    assert_eq!(r.header("retry-after-ms"), Some("41500"));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("10"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset-tokens"), Some("42s"));
    let body = r.json();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per-key"),
        "{body}"
    );
    assert!(
        up.requests().is_empty(),
        "a denied request must not reach the upstream"
    );
    assert_eq!(e.metric("checks_denied"), 1);
    assert_eq!(e.metric("checks_allowed"), 0);
}

#[test]
fn configured_deny_reply() {
    let (svc, up) = (deny_all(), upstream());
    let mut config = plugin(json!([{"name": "g", "key": "", "tokens": 10, "window": 60}]));
    config["deny"] = json!({"status": 403, "body": "{\"msg\":\"over budget\"}", "headers": {"content-type": "application/json", "x-budget": "exhausted"}});
    let e = envoy(&config, &svc, &up);
    let r = http::post_json(e.port, "/v1/chat/completions", &[], &json!({}));
    assert_eq!(r.status, 403);
    assert_eq!(r.json(), json!({"msg": "over budget"}));
    assert_eq!(r.header("x-budget"), Some("exhausted"));
    assert_eq!(r.header("retry-after"), Some("42"));
}

#[test]
fn quota_headers_can_be_turned_off() {
    let (svc, up) = (allow_all(), upstream());
    let mut config = plugin(json!([{"name": "g", "key": "", "tokens": 10, "window": 60}]));
    config["quota_headers"] = json!(false);
    let e = envoy(&config, &svc, &up);
    let r = http::post_json(e.port, "/v1/chat/completions", &[], &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), None);
}

#[test]
fn every_key_source_reaches_the_service() {
    let (svc, up) = (allow_all(), upstream());
    let mut config = plugin(json!([
        {"name": "header", "key": "{{request.headers.x-user}}", "tokens": 1, "window": "1s"},
        {"name": "query", "key": "{{request.query.apikey}}", "tokens": 2, "window": "1m"},
        {"name": "cookie", "key": "{{request.cookies.session}}", "tokens": 3, "window": "1h"},
        {"name": "consumer", "key": "{{consumer}}", "tokens": 4, "window": "1d"},
        {"name": "ip", "key": "{{source.ip}}", "tokens": 5, "window": 30},
        {"name": "composite", "key": "{{request.method}} {{request.host}}{{request.path}} @{{route}}", "tokens": 6, "window": "2m"},
        {"name": "property", "key": "{{xds.route_name}}", "tokens": 7, "window": "1m"},
        {"name": "global", "key": "", "rates": [{"tokens": 8, "window": "1m"}, {"tokens": 80, "window": "1d"}]},
        {"name": "service-owned", "key": "{{request.headers.user-type}}"},
        {"name": "absent", "key": "{{request.headers.x-absent}}", "tokens": 9, "window": "1m"}
    ]));
    config["consumer_header"] = json!("X-Consumer");
    let e = envoy(&config, &svc, &up);
    let r = http::post_json(
        e.port,
        "/v1/chat/completions?apikey=k%201",
        &[
            ("x-user", "alice"),
            ("cookie", "a=b; session=s-9"),
            ("x-consumer", "team-a"),
            ("user-type", "regular-user"),
        ],
        &json!({}),
    );
    assert_eq!(r.status, 200);
    let got = svc.checks()[0].json();
    let rate = |t: u64, w: u64| json!([{"tokens": t, "window_s": w}]);
    assert_eq!(
        got["descriptors"],
        json!([
            {"limit": "header", "value": "alice", "rates": rate(1, 1)},
            {"limit": "query", "value": "k 1", "rates": rate(2, 60)},
            {"limit": "cookie", "value": "s-9", "rates": rate(3, 3600)},
            {"limit": "consumer", "value": "team-a", "rates": rate(4, 86400)},
            {"limit": "ip", "value": "127.0.0.1", "rates": rate(5, 30)},
            {"limit": "composite", "value": "POST llm.test/v1/chat/completions @llm-route", "rates": rate(6, 120)},
            {"limit": "property", "value": "llm-route", "rates": rate(7, 60)},
            {"limit": "global", "value": "", "rates": [{"tokens": 8, "window_s": 60}, {"tokens": 80, "window_s": 86400}]},
            {"limit": "service-owned", "value": "regular-user"}
        ])
    );
}

#[test]
fn forwarded_for_is_counted_from_the_right() {
    let (svc, up) = (allow_all(), upstream());
    let mut config =
        plugin(json!([{"name": "ip", "key": "{{source.ip}}", "tokens": 5, "window": 30}]));
    // Envoy (use_remote_address) appends the peer: 3 hops from the right is the entry the
    // proxy in front of it wrote.
    config["client_ip"] = json!({"header": "x-forwarded-for", "trusted_hops": 3});
    let e = envoy(&config, &svc, &up);
    let spoofed = [("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.1")];
    assert_eq!(
        http::post_json(e.port, "/v1/x", &spoofed, &json!({})).status,
        200
    );
    // Too few entries: the peer address, never nothing.
    assert_eq!(
        http::post_json(
            e.port,
            "/v1/x",
            &[("x-forwarded-for", "10.0.0.1")],
            &json!({})
        )
        .status,
        200
    );
    let values: Vec<Value> = svc
        .checks()
        .iter()
        .map(|r| r.json()["descriptors"][0]["value"].clone())
        .collect();
    assert_eq!(values, vec![json!("203.0.113.7"), json!("127.0.0.1")]);
}

/// An IPv6 client is keyed by its /64 (`client_ip.ipv6_prefix`): rotating addresses inside
/// one's own /64 is no fresh budget, another /64 is another client, and an IPv4-mapped address
/// is the IPv4 client. Real service: 5 tokens an hour per client, answers of 3.
#[test]
fn ipv6_clients_share_a_budget_per_64() {
    let svc = testkit::service::Service::start(&[], &[]);
    let up = upstream();
    let mut config =
        plugin(json!([{"name": "ip", "key": "{{source.ip}}", "tokens": 5, "window": "1h"}]));
    // Envoy appends the peer: the entry before it is the one the proxy in front wrote.
    config["client_ip"] = json!({"header": "x-forwarded-for", "trusted_hops": 2});
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let from = |client: &str| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-forwarded-for", client)],
            &json!({}),
        )
        .status
    };
    assert_eq!(from("2001:db8:1:2::a"), 200);
    svc.await_remaining("ip", "2001:db8:1:2::/64", 2);
    assert_eq!(from("2001:db8:1:2:ffff:ffff:ffff:fffb"), 200, "2 left");
    svc.await_remaining("ip", "2001:db8:1:2::/64", 0);
    assert_eq!(
        from("2001:db8:1:2::c"),
        429,
        "a third address of the same /64"
    );
    assert_eq!(from("2001:db8:1:3::1"), 200, "another /64");
    svc.await_remaining("ip", "2001:db8:1:3::/64", 2);
    assert_eq!(from("::ffff:203.0.113.7"), 200);
    svc.await_remaining("ip", "203.0.113.7", 2);
    assert_eq!(from("203.0.113.7"), 200, "the same IPv4 client");
    svc.await_remaining("ip", "203.0.113.7", 0);
}

#[test]
fn ipv6_peer_and_cidr_value_rules() {
    let (svc, up) = (allow_all(), upstream());
    let config = plugin(json!([{"name": "ip", "key": "{{source.ip}}", "values": [
        {"match": "10.0.0.0/8", "tokens": 1, "window": "1m"},
        {"match": "::1/128", "tokens": 2, "window": "1m", "shared": true},
        {"match": "*", "tokens": 3, "window": "1m"}
    ]}]));
    let e = Envoy::try_start(
        &config.to_string(),
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
        "::1",
    )
    .unwrap_or_else(|log| panic!("{log}"));
    let r = http::send_to(&format!("[::1]:{}", e.port), "POST", "/v1/x", &[], b"{}");
    assert_eq!(r.status, 200);
    assert_eq!(
        svc.checks()[0].json()["descriptors"],
        json!([{"limit": "ip", "value": "::1/128", "rates": [{"tokens": 2, "window_s": 60}], "shared": true}])
    );
}

#[test]
fn value_rules_pick_rates_per_value() {
    let (svc, up) = (allow_all(), upstream());
    let e = envoy(
        &plugin(
            json!([{"name": "apikey", "key": "{{request.query.apikey}}", "values": [
                {"match": "9a342114-ba8a-11ec-b1bf-00163e1250b5", "tokens": 10, "window": "1m"},
                {"match": "regexp:^a.*", "rates": [{"tokens": 10, "window": "1s"}, {"tokens": 5000, "window": "1d"}]}
            ]}]),
        ),
        &svc,
        &up,
    );
    for key in ["9a342114-ba8a-11ec-b1bf-00163e1250b5", "abc", "zzz"] {
        assert_eq!(
            http::post_json(e.port, &format!("/v1/x?apikey={key}"), &[], &json!({})).status,
            200
        );
    }
    let checks = svc.checks();
    assert_eq!(
        checks.len(),
        2,
        "a value no rule matches is not limited and costs no check"
    );
    assert_eq!(
        checks[0].json()["descriptors"][0]["rates"],
        json!([{"tokens": 10, "window_s": 60}])
    );
    assert_eq!(
        checks[1].json()["descriptors"][0]["rates"],
        json!([{"tokens": 10, "window_s": 1}, {"tokens": 5000, "window_s": 86400}])
    );
    assert_eq!(e.metric("requests_unlimited"), 1);
    assert_eq!(up.requests().len(), 3);
}

#[test]
fn only_matching_requests_are_checked() {
    let (svc, up) = (allow_all(), upstream());
    let mut config = plugin(json!([{"name": "g", "key": "", "tokens": 10, "window": 60}]));
    config["matches"] = json!([
        {"host": {"exact": "LLM.test"}, "path": {"prefix": "/v1/"}, "method": "POST", "headers": {"x-tier": {"regex": "^(free|trial)$"}}},
        {"path": {"exact": "/other"}, "method": ["GET", "PUT"]}
    ]);
    let e = envoy(&config, &svc, &up);
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], bool);
    let cases: [Case; 7] = [
        ("POST", "/v1/chat?x=1", &[("x-tier", "free")], true),
        (
            "POST",
            "/v1/chat",
            &[("x-tier", "trial"), ("host", "llm.test:8080")],
            true,
        ),
        ("POST", "/v1/chat", &[("x-tier", "paid")], false),
        ("POST", "/v1/chat", &[], false),
        ("GET", "/v1/chat", &[("x-tier", "free")], false),
        ("GET", "/other?q", &[], true),
        ("POST", "/v2/chat", &[("x-tier", "free")], false),
    ];
    let mut expected = 0;
    for (method, path, headers, limited) in cases {
        let r = http::send(e.port, method, path, headers, b"{}");
        assert_eq!(r.status, 200);
        expected += limited as usize;
        assert_eq!(svc.checks().len(), expected, "{method} {path} {headers:?}");
    }
    assert_eq!(up.requests().len(), cases.len());
    assert_eq!(e.metric("requests_matched"), expected as u64);
}

#[test]
fn model_and_reserve_come_from_the_request_body() {
    let (svc, up) = (allow_all(), upstream());
    let mut config =
        plugin(json!([{"name": "model", "key": "{{llm.model}}", "tokens": 50000, "window": "1m"}]));
    config["reserve"] = json!({"tokens": "max_tokens"});
    config["max_request_body_bytes"] = json!(2000);
    let e = envoy(&config, &svc, &up);
    let body = json!({"model": "gpt-4o", "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        http::post_json(e.port, "/v1/chat/completions", &[], &body).status,
        200
    );
    let check = svc.checks()[0].json();
    assert_eq!(check["descriptors"][0]["value"], "gpt-4o");
    assert_eq!(check["reserve"], 256);
    assert_eq!(
        up.requests()[0].json(),
        body,
        "the upstream gets the body unchanged"
    );

    // Over the bound or not JSON: the request still passes, and its model, unknown, is not a
    // way around the model's limit: it is counted under `(unreadable)`.
    let big = json!({"model": "gpt-4o", "messages": [{"content": "x".repeat(5000)}]});
    assert_eq!(
        http::post_json(e.port, "/v1/chat/completions", &[], &big).status,
        200
    );
    assert_eq!(
        http::send(e.port, "POST", "/v1/chat/completions", &[], b"not json").status,
        200
    );
    let checks = svc.checks();
    assert_eq!(checks.len(), 3);
    for check in &checks[1..] {
        assert_eq!(check.json()["descriptors"][0]["value"], "(unreadable)");
        assert_eq!(
            check.json()["reserve"],
            4096,
            "no output cap could be read: `reserve.default`"
        );
    }
    assert_eq!(up.requests().len(), 3);
    assert_eq!(up.requests()[1].json(), big);
    assert_eq!(e.metric("request_body_unreadable"), 2);
}

#[test]
fn asm_protocol_check_and_denial() {
    let svc = Server::start(|req| {
        let keys = req
            .path
            .split_once("ratelimit_keys=")
            .map(|(_, k)| k.to_string())
            .unwrap_or_default();
        if keys.contains("regular-user") {
            json_reply(
                200,
                json!({"allow": false, "description": "regular-user is being rate-limited"}),
            )
        } else {
            json_reply(200, json!({"allow": true, "description": ""}))
        }
    });
    let up = upstream();
    let mut config = plugin(json!([{"name": "user-type", "key": "{{request.headers.user-type}}"}]));
    config["service"]["protocol"] = json!("asm");
    let e = envoy(&config, &svc, &up);
    let denied = http::post_json(
        e.port,
        "/v1/chat",
        &[("user-type", "regular-user")],
        &json!({}),
    );
    assert_eq!(denied.status, 429);
    assert_eq!(denied.text(), "regular-user is being rate-limited");
    let allowed = http::post_json(
        e.port,
        "/v1/chat",
        &[("user-type", "subscriber")],
        &json!({}),
    );
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("x-ratelimit-remaining-tokens"),
        None,
        "ASM has no figures"
    );
    let checks = svc.checks();
    assert_eq!(checks[0].method, "GET");
    assert_eq!(
        checks[0].path,
        "/ratelimit?ratelimit_keys=%5B%22regular-user%22%5D"
    );
}

#[test]
fn istio_cluster_naming_from_host_and_port() {
    let (svc, up) = (allow_all(), upstream());
    let config = json!({"service": {"host": "ratelimit.test", "port": 8080}, "limits": [{"name": "g", "key": "", "tokens": 1, "window": 1}]});
    let e = Envoy::start(
        &config,
        &[
            cluster("outbound|8080||ratelimit.test", svc.port),
            cluster("upstream", up.port),
        ],
    );
    assert_eq!(
        http::post_json(e.port, "/v1/x", &[], &json!({})).status,
        200
    );
    let checks = svc.checks();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].header("host"), Some("ratelimit.test"));
}

#[test]
fn limited_requests_are_readable_and_streams_ask_for_usage() {
    let (svc, up) = (allow_all(), upstream());
    let e = envoy(
        &plugin(json!([{"name": "g", "key": "", "tokens": 100, "window": "1m"}])),
        &svc,
        &up,
    );
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = http::post_json(
        e.port,
        "/v1/chat/completions",
        &[("accept-encoding", "gzip, br")],
        &body,
    );
    assert_eq!(r.status, 200);
    let got = &up.requests()[0];
    assert_eq!(
        got.header("accept-encoding"),
        None,
        "usage must come back readable"
    );
    let mut want = body.clone();
    want["stream_options"] = json!({"include_usage": true});
    assert_eq!(
        got.json(),
        want,
        "the rest of the body is as the client sent it"
    );
    assert_eq!(
        got.header("content-length"),
        None,
        "the grown body is sent chunked"
    );

    // Not limited (no match): nothing is touched.
    let mut config = plugin(json!([{"name": "g", "key": "", "tokens": 100, "window": "1m"}]));
    config["matches"] = json!([{"path": {"prefix": "/limited/"}}]);
    let e2 = envoy(&config, &svc, &up);
    http::post_json(
        e2.port,
        "/v1/chat/completions",
        &[("accept-encoding", "gzip")],
        &body,
    );
    let got = &up.requests()[1];
    assert_eq!(got.header("accept-encoding"), Some("gzip"));
    assert_eq!(got.json(), body);
}

#[test]
fn reports_carry_ids_descriptors_reserve_and_usage() {
    let svc = allow_all();
    let up = Server::start(|req| {
        if req.path.contains("gzip") {
            let mut r = http::reply(200, "application/json", vec![0x1f; 400]);
            if let http::Behaviour::Reply(resp) = &mut r {
                resp.headers
                    .push(("content-encoding".into(), "gzip".into()));
            }
            return r;
        }
        json_reply(
            200,
            json!({"usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}),
        )
    });
    let mut config = plugin(
        json!([{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 100, "window": "1m"}]),
    );
    config["reserve"] = json!({"tokens": 3});
    let e = envoy(&config, &svc, &up);
    let reports = || -> Vec<Value> {
        svc.reports()
            .iter()
            .flat_map(|r| r.json()["reports"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let await_reports = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reports().len() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        reports()
    };
    let ask = |path: &str, user: &str| {
        let r = http::post_json(e.port, path, &[("x-user", user)], &json!({"model": "m"}));
        assert_eq!(r.status, 200);
    };
    ask("/v1/chat/completions", "ann");
    let first = await_reports(1);
    assert_eq!(first.len(), 1, "{first:?}");
    let id = first[0]["id"].as_str().unwrap();
    let (source, seq) = id.split_once('-').unwrap();
    assert!(
        source.len() == 16 && source.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(seq.parse::<u64>().is_ok(), "{id}");
    assert_eq!(
        first[0]["descriptors"],
        json!([{"limit": "user", "value": "ann", "rates": [{"tokens": 100, "window_s": 60}]}])
    );
    // 10 tokens used after 3 were reserved: the report charges the 7 beyond the reservation.
    assert_eq!(first[0]["tokens"], 7);
    assert_eq!(first[0]["reserved"], 0);
    assert_eq!(
        first[0]["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10})
    );
    ask("/v1/chat/completions", "bob");
    ask("/gzip", "cy");
    let all = await_reports(3);
    assert_eq!(all.len(), 3, "{all:?}");
    let ids: std::collections::HashSet<&str> =
        all.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "ids are unique: {ids:?}");
    // A compressed body cannot be read: its size stands in for the text (400 bytes → 100
    // tokens) and the request's for the prompt (13 bytes → 4 tokens): 104, 3 reserved.
    let gz = all
        .iter()
        .find(|r| r["descriptors"][0]["value"] == "cy")
        .unwrap();
    assert_eq!(gz["tokens"], 101);
    assert_eq!(e.metric("usage.estimated"), 1);
}
