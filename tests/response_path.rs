#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http::{self, json_reply, Server};
use testkit::service::Service;

#[test]
fn probe() {
    let svc = Service::start(&[], &[]);
    let up = Server::start(|_| {
        json_reply(
            200,
            json!({"id": "c", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
        )
    });
    let config = json!({"service": {"cluster": "ratelimit"}, "limits": [{"name": "u", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]});
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    for _ in 0..3 {
        let r = http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", "a")],
            &json!({"model": "m"}),
        );
        assert_eq!(r.status, 200);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let q = http::send(svc.port, "GET", "/v1/quota?limit=u&value=a", &[], b"").json();
    println!(
        "{q}\n{:?}",
        e.metrics()
            .iter()
            .filter(|(k, _)| k.contains("llm"))
            .collect::<Vec<_>>()
    );
    println!("{}", e.log());
    assert_eq!(q["meters"][0]["remaining"], 1000 - 21);
}
