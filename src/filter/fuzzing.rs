//! The shell driven by a fuzzer through the fake host (`make fuzz`, `--cfg fuzzing` only): any
//! bytes in every request and response header the plugin reads.

#![allow(clippy::panic)] // a broken promise must fail the fuzz run

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};

use super::fake::FakeHost;
use super::host::Host;
use super::root::Root;

/// Every header the configuration below reads, in the order the fuzzer's values fill them.
pub const HEADERS: [&str; 12] = [
    ":method",
    ":path",
    ":authority",
    "x-user",
    "authorization",
    "cookie",
    "x-consumer",
    "x-forwarded-for",
    "x-tier",
    "content-length",
    "x-route",
    "x-other",
];

const CONFIG: &str = r#"{
    "service": {"cluster": "rl"},
    "matches": [{"headers": {"x-route": {"present": true}}}, {"path": {"prefix": "/v1/"}}],
    "client_ip": {"header": "x-forwarded-for", "trusted_hops": 1},
    "consumer_header": "x-consumer",
    "reserve": {"tokens": 10},
    "limits": [
        {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"},
        {"name": "key", "key": "{{request.headers.authorization}}|{{request.query.k}}|{{request.cookies.sid}}", "tokens": 1000, "window": "1h"},
        {"name": "who", "key": "{{consumer}}{{source.ip}}{{request.host}}{{request.path}}{{request.method}}", "tokens": 1000, "window": "1h"},
        {"name": "tier", "key": "{{request.headers.x-tier}}", "values": [
            {"match": "free", "tokens": 10, "window": "1h"},
            {"match": "regexp:^p", "tokens": 100, "window": "1h"},
            {"match": "*", "tokens": 1000, "window": "1h"}],
         "when": {"headers": {"x-tier": {"regex": "."}}}}
    ]
}"#;

/// One request with `request` header values (by [`HEADERS`], absent when `None`) and response
/// headers `response`, through admission, response and report. Panics if the plugin panics,
/// or if a request that names a user is not checked against that user's limit.
pub fn request(request: &[Option<Vec<u8>>], response: &[(String, Vec<u8>)], body: &[u8]) {
    let host = Rc::new(FakeHost::default());
    host.state().config = CONFIG.as_bytes().to_vec();
    let dyn_host: Rc<dyn Host> = host.clone();
    let mut root = Root::new(1, dyn_host);
    if !root.on_configure(0) {
        panic!("the configuration must load");
    }
    host.state().request_headers = HEADERS
        .iter()
        .zip(request)
        .filter_map(|(name, value)| Some((name.to_string(), value.clone()?)))
        .collect();
    host.state()
        .properties
        .insert("source.address".into(), b"10.0.0.1:5".to_vec());
    let mut http = root.http();
    http.on_http_request_headers(HEADERS.len(), true);
    let names_user = request.get(3).is_some_and(Option::is_some);
    if host.calls() > 0 {
        let check = host.call_json(0);
        let users = check["descriptors"]
            .as_array()
            .map_or(0, |ds| ds.iter().filter(|d| d["limit"] == "user").count());
        if names_user && users != 1 {
            panic!("the user's limit must apply: {check}");
        }
        let allowed = br#"{"allowed": true, "limits": [], "reserved_at_ms": 1}"#.to_vec();
        let len = allowed.len();
        host.state().answer = (200, allowed);
        http.on_http_call_response(host.token(0), 1, len, 0);
    }
    host.state().response_headers = response.to_vec();
    host.state().response_body = body.to_vec();
    http.on_http_response_headers(response.len(), body.is_empty());
    if !body.is_empty() {
        http.on_http_response_body(body.len(), true);
    }
    http.on_log();
    root.on_tick();
}
