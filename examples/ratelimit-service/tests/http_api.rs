//! The service binary over HTTP: every endpoint, the ASM shapes, bad input, configuration
//! errors, and a graceful SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use testkit::http::{self, send};
use testkit::redis::RedisServer;
use testkit::service::Service;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ratelimit-service"))
}

fn start(args: &[&str], env: &[(&str, &str)]) -> Service {
    Service::start_binary(bin(), args, env)
}

use testkit::ASM_EXAMPLE_RULES as ASM_RULES;

fn v1_roundtrip(s: &Service) {
    let d =
        json!({"limit": "per-user", "value": "alice", "rates": [{"tokens": 100, "window_s": 60}]});
    let r = http::post_json(
        s.port,
        "/v1/check",
        &[],
        &json!({"descriptors": [d], "reserve": 30}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["allowed"], true);
    assert_eq!(body["limits"][0]["remaining"], 70);
    assert_eq!(body["limits"][0]["tokens"], 100);
    assert_eq!(body["limits"][0]["window_s"], 60);
    assert_eq!(body["denied_by"], serde_json::Value::Null);
    let report = json!({"reports": [{"id": "00000000000000aa-1", "descriptors": [d], "tokens": 105, "reserved": 30,
                                      "usage": {"prompt_tokens": 10, "completion_tokens": 95, "total_tokens": 105}}]});
    let r = http::post_json(s.port, "/v1/report", &[], &report);
    assert_eq!(
        r.json(),
        json!({"accepted": 1, "duplicates": 0, "results": [{"outcome": "applied"}]})
    );
    let r = http::post_json(s.port, "/v1/report", &[], &report);
    assert_eq!(
        r.json(),
        json!({"accepted": 0, "duplicates": 1, "results": [{"outcome": "duplicate"}]}),
        "a retried report is not charged twice"
    );
    let r = http::post_json(s.port, "/v1/check", &[], &json!({"descriptors": [d]}));
    let body = r.json();
    assert_eq!(body["allowed"], false, "{body}");
    assert_eq!(body["limits"][0]["remaining"], 0);
    assert_eq!(body["denied_by"], "per-user");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    let q = send(
        s.port,
        "GET",
        "/v1/quota?limit=per-user&value=alice",
        &[],
        b"",
    )
    .json();
    assert_eq!(q["meters"][0]["remaining"], 0);
    assert_eq!(q["meters"][0]["tokens"], 100);
}

#[test]
fn v1_endpoints_memory() {
    v1_roundtrip(&start(&[], &[]));
}

#[test]
fn v1_endpoints_redis() {
    let redis = RedisServer::start();
    let s = start(&["--redis-url", &redis.url()], &[]);
    v1_roundtrip(&s);
    assert!(send(s.port, "GET", "/metrics", &[], b"")
        .text()
        .contains("ratelimit_store_info{store=\"redis\"} 1"));
}

/// ASM documents `REDIS_PASSWORD` as `user:password`: that logs in as the ACL user (here the
/// only way in: the default user is off).
#[test]
fn asm_redis_password_logs_in_as_an_acl_user() {
    let redis = RedisServer::start_with(&[
        "--user",
        "default",
        "off",
        "--user",
        "llm",
        "on",
        ">pa:ss word",
        "~*",
        "&*",
        "+@all",
    ]);
    let addr = format!("127.0.0.1:{}", redis.port);
    let ready = |password: &str| {
        let s = start(
            &[],
            &[
                ("RATE_LIMIT_CONFIG", ASM_RULES),
                ("REDIS_ADDRESS", &addr),
                ("REDIS_PASSWORD", password),
            ],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = send(s.port, "GET", "/readyz", &[], b"").status;
            if status == 200 || std::time::Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(
        ready("llm:pa:ss word"),
        200,
        "user llm, password `pa:ss word`"
    );
    assert_eq!(ready("pa:ss word"), 503, "user `pa` does not exist");
}

#[test]
fn asm_endpoints_with_asm_environment() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret pass"]);
    let addr = format!("127.0.0.1:{}", redis.port);
    let s = start(
        &[],
        &[
            ("RATE_LIMIT_CONFIG", ASM_RULES),
            ("REDIS_ADDRESS", &addr),
            ("REDIS_PASSWORD", "s3cret pass"),
            ("REDIS_DB_INDEX", "3"),
        ],
    );
    let check = |keys: &str| {
        send(
            s.port,
            "GET",
            &format!("/ratelimit?ratelimit_keys={}", percent(keys)),
            &[],
            b"",
        )
    };
    let r = check(r#"["regular-user"]"#);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"allow": true, "description": ""}));
    let update = json!({"ratelimit_keys": ["regular-user"], "prompt_tokens": 300, "completion_tokens": 700, "total_tokens": 1000});
    assert_eq!(
        http::post_json(s.port, "/update_ratelimit_record", &[], &update).status,
        200
    );
    assert_eq!(
        check(r#"["regular-user"]"#).json(),
        json!({"allow": false, "description": "regular-user is being rate-limited"})
    );
    assert_eq!(check(r#"["subscriber"]"#).json()["allow"], true);
    assert_eq!(
        check(r#"["subscriber","regular-user"]"#).json()["allow"],
        false
    );
    assert_eq!(check("not json").status, 400);
    assert_eq!(send(s.port, "GET", "/ratelimit", &[], b"").status, 400);
    // The counters are in database 3, behind the password.
    let dbsize = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "-a",
            "s3cret pass",
            "--no-auth-warning",
            "-n",
            "3",
            "DBSIZE",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dbsize.stdout).trim(),
        "2",
        "regular-user and subscriber buckets"
    );
}

fn percent(s: &str) -> String {
    http::percent_encode(s)
}

#[test]
fn health_readiness_metrics() {
    let s = start(&[], &[]);
    assert_eq!(send(s.port, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(send(s.port, "GET", "/readyz", &[], b"").status, 200);
    http::post_json(
        s.port,
        "/v1/check",
        &[],
        &json!({"descriptors": [{"limit": "g", "value": "", "rates": [{"tokens": 5, "window_s": 1}]}]}),
    );
    let m = send(s.port, "GET", "/metrics", &[], b"");
    assert_eq!(m.status, 200);
    let text = m.text();
    for line in [
        "ratelimit_checks_total{outcome=\"allowed\"} 1",
        "ratelimit_store_info{store=\"memory\"} 1",
        "ratelimit_memory_counters 1",
        "ratelimit_check_duration_seconds_count 1",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn readiness_follows_redis() {
    let mut redis = RedisServer::start();
    let s = start(
        &[
            "--store",
            "redis",
            "--redis-url",
            &redis.url(),
            "--store-timeout-ms",
            "200",
        ],
        &[],
    );
    assert_eq!(send(s.port, "GET", "/readyz", &[], b"").status, 200);
    redis.kill();
    assert_eq!(send(s.port, "GET", "/readyz", &[], b"").status, 503);
    let d = json!({"descriptors": [{"limit": "g", "value": "", "rates": [{"tokens": 5, "window_s": 1}]}]});
    let r = http::post_json(s.port, "/v1/check", &[], &d);
    assert_eq!(r.status, 503, "the plugin's failure_mode must decide");
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("store unavailable"));
    redis.start_again();
    let mut ok = false;
    for _ in 0..100 {
        if http::post_json(s.port, "/v1/check", &[], &d).status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the service must recover by itself");
    assert!(send(s.port, "GET", "/metrics", &[], b"")
        .text()
        .contains("ratelimit_store_errors_total"));
}

#[test]
fn bad_requests_get_json_errors() {
    let s = start(&[], &[]);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/check", b"{".to_vec(), 400, "invalid JSON body"),
        ("POST", "/v1/check", br#"{"descriptors": "x"}"#.to_vec(), 400, "invalid JSON body"),
        ("POST", "/v1/check", br#"{"descriptors": [{"limit": "a", "value": "b", "rates": [{"tokens": 0, "window_s": 1}]}]}"#.to_vec(), 400, "descriptors[0].rates[0].tokens"),
        ("POST", "/v1/check", br#"{"descriptors": [{"limit": "a", "value": "b", "rates": [{"tokens": -1, "window_s": 1}]}]}"#.to_vec(), 400, "invalid JSON body"),
        ("POST", "/v1/check", vec![b' '; 5 * 1024 * 1024], 413, "body larger than"),
        ("GET", "/v1/check", Vec::new(), 405, "method not allowed"),
        ("GET", "/nope", Vec::new(), 404, "no such endpoint"),
        ("POST", "/healthz", Vec::new(), 405, "method not allowed"),
        // The clock moves only under --manual-clock; otherwise there is no such endpoint.
        ("POST", "/v1/clock?advance_ms=1", Vec::new(), 404, "no such endpoint"),
        ("GET", "/v1/clock", Vec::new(), 404, "no such endpoint"),
        ("GET", "/v1/quota?limit=a", Vec::new(), 400, "give limit= and value="),
    ];
    for (method, path, body, status, message) in cases {
        let r = send(
            s.port,
            method,
            path,
            &[("content-type", "application/json")],
            &body,
        );
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{method} {path}: {}",
            r.text()
        );
    }
    // A malformed report is refused on its own, with the reason; its batch is answered.
    let r = send(
        s.port,
        "POST",
        "/v1/report",
        &[("content-type", "application/json")],
        br#"{"reports": [{"id": "", "descriptors": [], "tokens": 1}, {"id": "00000000000000ab-1", "descriptors": [], "tokens": 1}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let results = &r.json()["results"];
    assert_eq!(results[0]["outcome"], "rejected");
    assert!(results[0]["error"]
        .as_str()
        .unwrap()
        .contains("reports[0].id"));
    assert_eq!(results[1]["outcome"], "applied");
    // Still serving after all of that.
    assert_eq!(send(s.port, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn slow_clients_neither_block_others_nor_stay_forever() {
    use std::io::{Read, Write};
    let s = start(&[], &[]);
    // 200 clients that send half a request head and then nothing.
    let mut slow: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
            c.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-le")
                .unwrap();
            c
        })
        .collect();
    v1_roundtrip(&s);
    // A client whose body never comes is served the moment it does, others meanwhile.
    let mut trickle = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    trickle
        .write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: 200\r\n\r\n{")
        .unwrap();
    assert_eq!(send(s.port, "GET", "/healthz", &[], b"").status, 200);
    // The half-sent heads are dropped after the header timeout.
    let c = slow.first_mut().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(send(s.port, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits() {
    use std::io::{Read, Write};
    let mut s = start(&[], &[]);
    // A request whose body is still arriving when SIGTERM comes must be answered.
    let body = json!({"descriptors": [{"limit": "g", "value": "", "rates": [{"tokens": 5, "window_s": 1}]}]}).to_string();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        conn,
        "POST /v1/check HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    conn.write_all(&body.as_bytes()[10..]).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"allowed\":true"), "{answer}");
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}\n{}", s.log());
    assert!(s.log().contains("shutting down"), "{}", s.log());
    // New connections are refused once it is gone.
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err());
}

#[test]
fn configuration_errors_and_help() {
    let (status, text) = testkit::service::run(bin(), &["--help"], &[]);
    assert!(status.success());
    for flag in [
        "--listen",
        "--store",
        "--redis-url",
        "--rules",
        "RATE_LIMIT_CONFIG",
        "REDIS_ADDRESS",
        "--window",
    ] {
        assert!(
            text.contains(flag),
            "--help does not explain {flag}:\n{text}"
        );
    }
    let (status, text) = testkit::service::run(bin(), &["--store", "redis"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(text.contains("--store redis needs --redis-url"), "{text}");
    let (status, text) = testkit::service::run(
        bin(),
        &[],
        &[("RATE_LIMIT_CONFIG", "[{\"rate_limit_key_regex\": \"(\"}]")],
    );
    assert_eq!(status.code(), Some(2));
    assert!(text.contains("RATE_LIMIT_CONFIG"), "{text}");
}

#[test]
fn rules_file() {
    let dir = testkit::TempDir::new("rules");
    let path = dir.0.join("rules.json");
    std::fs::write(&path, ASM_RULES).unwrap();
    let s = start(&["--rules", path.to_str().unwrap()], &[]);
    let d = json!({"descriptors": [{"limit": "user-type", "value": "regular-user"}]});
    let r = http::post_json(s.port, "/v1/check", &[], &d).json();
    assert_eq!(r["limits"][0]["tokens"], 200, "{r}");
    assert_eq!(r["limits"][0]["window_s"], 30);
}

/// A client rotating a key value (a header it controls) floods a small memory store with new
/// counters: every check is still answered, and a budget in use stays spent throughout.
#[test]
fn a_flood_of_new_keys_never_switches_limiting_off() {
    // 640 counters in 64 shards: ten each, so 5,000 new keys force evictions everywhere.
    let s = start(&["--max-counters", "640"], &[]);
    let check = |value: &str| {
        let d = json!({"limit": "per-user", "value": value, "rates": [{"tokens": 100, "window_s": 3600}]});
        let r = http::post_json(s.port, "/v1/check", &[], &json!({"descriptors": [d]}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["allowed"].as_bool().unwrap()
    };
    let spend = json!({"reports": [{"id": "00000000000000f1-1", "descriptors": [
        {"limit": "per-user", "value": "alice", "rates": [{"tokens": 100, "window_s": 3600}]}], "tokens": 100}]});
    assert_eq!(
        http::post_json(s.port, "/v1/report", &[], &spend).json()["accepted"],
        1
    );
    assert!(!check("alice"));
    for i in 0..5_000 {
        assert!(
            check(&format!("flood-{i}")),
            "a new key starts with its budget"
        );
        if i % 20 == 0 {
            assert!(
                !check("alice"),
                "alice's spent budget stays spent (flood key {i})"
            );
        }
    }
    let metrics = send(s.port, "GET", "/metrics", &[], b"").text();
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap()
    };
    assert!(gauge("ratelimit_memory_counters") <= 640.0, "{metrics}");
    assert!(gauge("ratelimit_memory_evictions_total") > 0.0, "{metrics}");
}
