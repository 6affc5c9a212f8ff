//! Every way a check can fail, under both failure modes, in a real Envoy: no request may hang,
//! each follows `failure_mode`, and the failure kind is counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use serde_json::{json, Value};
use testkit::envoy::{cluster, Envoy};
use testkit::free_port;
use testkit::http::{self, json_reply, reply, Behaviour, Server};

fn upstream() -> Server {
    Server::start(|_| json_reply(200, json!({"ok": true})))
}

fn config(mode: &str, cluster_name: &str) -> Value {
    json!({
        "service": {"cluster": cluster_name, "timeout_ms": 250, "failure_mode": mode},
        "limits": [{"name": "g", "key": "", "tokens": 10, "window": "1m"}]
    })
}

/// Runs one failing service under both modes and checks the outcome and the metric.
fn check_failure(kind: &str, service: impl Fn() -> Option<Server>, cluster_name: &str) {
    for mode in ["allow", "deny"] {
        let up = upstream();
        let svc = service();
        // A port nobody listens on, when the failure is "no service at all".
        let svc_port = svc.as_ref().map_or_else(free_port, |s| s.port);
        let e = Envoy::start(
            &config(mode, cluster_name),
            &[cluster("ratelimit", svc_port), cluster("upstream", up.port)],
        );
        let r = http::post_json(e.port, "/v1/chat/completions", &[], &json!({}));
        match mode {
            "allow" => {
                assert_eq!(r.status, 200, "{kind}/{mode}: {}", r.text());
                assert_eq!(up.requests().len(), 1, "{kind}/{mode}");
                assert_eq!(e.metric("failure_mode_allowed"), 1, "{kind}/{mode}");
            }
            _ => {
                assert_eq!(r.status, 503, "{kind}/{mode}: {}", r.text());
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
                assert!(up.requests().is_empty(), "{kind}/{mode}");
                assert_eq!(e.metric("failure_mode_denied"), 1, "{kind}/{mode}");
            }
        }
        assert_eq!(
            e.metric(&format!("check_failures.{kind}")),
            1,
            "{kind}/{mode}: {:?}",
            e.metrics()
        );
    }
}

#[test]
fn unknown_cluster() {
    check_failure("dispatch", || None, "no-such-cluster");
}

#[test]
fn connection_refused() {
    check_failure("unavailable", || None, "ratelimit");
}

#[test]
fn timeout() {
    check_failure(
        "timeout",
        || {
            Some(Server::start(|_| {
                Behaviour::Delay(
                    Duration::from_secs(3),
                    Box::new(json_reply(200, json!({"allowed": true}))),
                )
            }))
        },
        "ratelimit",
    );
}

#[test]
fn reset_before_headers() {
    // Envoy turns an upstream reset into a local 503 for the callout.
    check_failure(
        "unavailable",
        || Some(Server::start(|_| Behaviour::Reset)),
        "ratelimit",
    );
}

#[test]
fn non_200_status() {
    check_failure(
        "status",
        || Some(Server::start(|_| json_reply(500, json!({"error": "boom"})))),
        "ratelimit",
    );
}

#[test]
fn unparsable_body() {
    check_failure(
        "body",
        || {
            Some(Server::start(|_| {
                reply(200, "text/html", "<html>oops</html>")
            }))
        },
        "ratelimit",
    );
}

#[test]
fn garbage_on_the_wire() {
    // Envoy answers the callout with a 502 of its own (protocol error).
    check_failure(
        "status",
        || {
            Some(Server::start(|_| {
                Behaviour::Raw(b"SSH-2.0-OpenSSH_9.0\r\n\r\n".to_vec())
            }))
        },
        "ratelimit",
    );
}

#[test]
fn custom_failure_status() {
    let up = upstream();
    let mut c = config("deny", "ratelimit");
    c["service"]["failure_status"] = json!(500);
    let e = Envoy::start(
        &c,
        &[
            cluster("ratelimit", free_port()),
            cluster("upstream", up.port),
        ],
    );
    assert_eq!(
        http::post_json(e.port, "/v1/x", &[], &json!({})).status,
        500
    );
}
