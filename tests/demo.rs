//! `make run`'s demo script, as a newcomer uses it: it starts, the curl flows it prints behave
//! as it says, and an interrupt stops every process it started.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::http;

fn demo(store: &str) {
    let ports: Vec<u16> = (0..5).map(|_| testkit::free_port()).collect();
    let [envoy, admin, service, llm, redis] = ports[..] else {
        unreachable!()
    };
    let mut child = Command::new(testkit::repo().join("examples/demo/run.sh"))
        .env("STORE", store)
        .env("ENVOY_PORT", envoy.to_string())
        .env("ADMIN_PORT", admin.to_string())
        .env("SERVICE_PORT", service.to_string())
        .env("LLM_PORT", llm.to_string())
        .env("REDIS_PORT", redis.to_string())
        .env("ENVOY_BIN", testkit::envoy::envoy_binary())
        .env("PLUGIN_WASM", testkit::envoy::plugin_wasm())
        .env("RATELIMIT_SERVICE_BIN", testkit::service::binary())
        .env("MOCK_LLM_BIN", testkit::service::mock_llm_binary())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line == "ready" {
                let _ = tx.send(text.clone());
            }
        }
    });
    let banner = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the demo did not start")
        });
    assert!(
        banner.contains(&format!("http://127.0.0.1:{envoy}")),
        "{banner}"
    );
    assert!(banner.contains(&format!("(store: {store})")), "{banner}");
    // The console's address is printed, and it serves.
    let console = format!("http://127.0.0.1:{service}/console");
    assert!(banner.contains(&console), "{banner}");
    assert_eq!(http::send(service, "GET", "/console", &[], b"").status, 200);

    let ask = |user: &str, body: serde_json::Value| {
        http::post_json(envoy, "/v1/chat/completions", &[("x-user", user)], &body)
    };
    let chat = json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]});
    // As printed: 100 tokens per user, 26 per answer: 200 200 200 200 then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(ask("alice", chat.clone()).status);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    let bob = ask("bob", chat.clone());
    assert_eq!(bob.status, 200);
    assert_eq!(bob.header("x-ratelimit-limit-tokens"), Some("100"));
    let stream = ask(
        "carol",
        json!({"model": "demo", "stream": true, "messages": []}),
    );
    assert!(stream.text().ends_with("data: [DONE]\n\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = http::send(
            service,
            "GET",
            "/v1/quota?limit=per-user&value=carol",
            &[],
            b"",
        )
        .json();
        if q["meters"][0]["remaining"] == 74 {
            break;
        }
        assert!(Instant::now() < deadline, "carol was not charged: {q}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Ctrl-C: everything stops.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut open = ports.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !open.is_empty() && Instant::now() < deadline {
        open.retain(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(open.is_empty(), "still listening after Ctrl-C: {open:?}");
}

#[test]
fn demo_with_the_memory_store() {
    demo("memory");
}

#[test]
fn demo_with_redis() {
    demo("redis");
}
