//! The shell run natively against a fake proxy: the paths an end-to-end test cannot steer
//! (a stream gone during its check, a timeout, answers for tokens nobody owns, a new
//! configuration taking over queued reports).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};

use super::http::Http;
use proxy_wasm::types::Action;
use serde_json::{json, Value};

use super::fake::{pairs, FakeHost};
use super::host::Host;
use super::root::Root;

fn config(reserve: u64, failure_mode: &str) -> Value {
    json!({
        "service": {"cluster": "rl", "failure_mode": failure_mode},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}],
        "reserve": {"tokens": reserve}
    })
}

/// A configured root context (id `id`) on `host`.
fn root(host: &Rc<FakeHost>, id: u32, config: &Value) -> Root {
    host.state().config = config.to_string().into_bytes();
    let dyn_host: Rc<dyn Host> = host.clone();
    let mut root = Root::new(id, dyn_host);
    assert!(root.on_configure(0));
    root
}

/// A stream of `root` whose request (no body) has arrived: its check is in flight.
fn request(host: &Rc<FakeHost>, root: &Root, user: &str) -> Http {
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "llm.test"),
        ("x-user", user),
    ]);
    let mut http = root.http();
    assert_eq!(http.on_http_request_headers(4, true), Action::Pause);
    http
}

/// Delivers the answer `(status, body)` to callout `token` of `ctx`.
fn answer(host: &FakeHost, ctx: &mut impl Context, token: u32, status: u32, body: &Value) {
    let body = body.to_string().into_bytes();
    let len = body.len();
    host.state().answer = (status, body);
    ctx.on_http_call_response(token, 1, len, 0);
}

/// The upstream answers 200 with `total` tokens of usage, and the stream ends.
fn respond_and_end(host: &FakeHost, http: &mut Http, total: u64) {
    host.state().response_headers = pairs(&[(":status", "200")]);
    let body =
        json!({"usage": {"prompt_tokens": 0, "completion_tokens": total, "total_tokens": total}})
            .to_string()
            .into_bytes();
    let len = body.len();
    host.state().response_body = body;
    assert_eq!(http.on_http_response_headers(1, false), Action::Continue);
    assert_eq!(http.on_http_response_body(len, true), Action::Continue);
    http.on_log();
}

fn allowed() -> Value {
    json!({"allowed": true, "limits": [{"limit": "user", "value": "ann", "tokens": 1000, "window_s": 3600, "remaining": 950, "reset_ms": 1}], "reserved_at_ms": 5000})
}

fn applied(n: usize) -> Value {
    json!({"accepted": n, "duplicates": 0, "results": vec![json!({"outcome": "applied"}); n]})
}

#[test]
fn an_admitted_request_is_reported_with_its_usage() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(0, "allow"));
    let mut http = request(&host, &root, "ann");
    assert_eq!(host.call_path(0), "/v1/check");
    assert_eq!(host.call_json(0)["descriptors"][0]["value"], "ann");
    answer(&host, &mut http, host.token(0), 200, &allowed());
    assert_eq!(host.state().resumed, 1);
    respond_and_end(&host, &mut http, 30);
    assert_eq!(host.metric("usage.reported"), 1);
    root.on_tick();
    assert_eq!(host.call_path(1), "/v1/report");
    assert_eq!(host.call_json(1)["reports"][0]["tokens"], 30);
    answer(&host, &mut root, host.token(1), 200, &applied(1));
    assert_eq!(host.metric("reports.sent"), 1);
    assert_eq!(host.metric("tokens_reported"), 30);
    assert_eq!(host.metric("report_queue"), 0);
}

#[test]
fn a_stream_gone_during_its_check_releases_its_reservation() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(50, "allow"));
    host.state().now_ms = 7_000;
    let mut http = request(&host, &root, "ann");
    let check = host.call_json(0);
    assert_eq!(check["reserve"], 50);
    let id = check["id"].as_str().unwrap().to_string();
    // The client goes away before the answer.
    http.on_log();
    root.on_tick();
    let report = &host.call_json(1)["reports"][0];
    assert_eq!(report["release"], json!(id));
    assert_eq!(
        (report["tokens"].clone(), report["reserved"].clone()),
        (json!(0), json!(50))
    );
    // It settles in the window of its reservation: when its check left (no answer has shown
    // the service's clock yet, so by this VM's).
    assert_eq!(report["reserved_at_ms"], 7_000);
    // The late answer finds nobody: ignored, counted.
    answer(&host, &mut http, host.token(0), 200, &allowed());
    assert_eq!(host.state().resumed, 0);
    assert_eq!(host.metric("callouts_unknown"), 1);
}

#[test]
fn a_check_that_timed_out_fails_open_and_its_report_releases_the_reservation() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(50, "allow"));
    // An earlier answer (at 0 by this VM's clock) showed the service's at 5 s.
    let mut earlier = request(&host, &root, "bob");
    answer(&host, &mut earlier, host.token(0), 200, &allowed());
    host.state().now_ms = 3_000;
    let mut http = request(&host, &root, "ann");
    let id = host.call_json(1)["id"].as_str().unwrap().to_string();
    // Envoy's answer for a callout past its deadline.
    answer(&host, &mut http, host.token(1), 504, &json!(null));
    assert_eq!(host.state().resumed, 2);
    assert_eq!(host.metric("check_failures.timeout"), 1);
    assert_eq!(host.metric("failure_mode_allowed"), 1);
    respond_and_end(&host, &mut http, 30);
    root.on_tick();
    let report = &host.call_json(2)["reports"][0];
    assert_eq!(report["release"], json!(id));
    assert_eq!(
        (report["tokens"].clone(), report["reserved"].clone()),
        (json!(30), json!(50))
    );
    // Settled in the window of its reservation, by the service's clock: sent at 3 s here,
    // 8 s there.
    assert_eq!(report["reserved_at_ms"], 8_000);
}

#[test]
fn a_check_refused_as_malformed_is_refused_even_when_failing_open() {
    let host = Rc::new(FakeHost::default());
    let root = root(&host, 1, &config(50, "allow"));
    let mut http = request(&host, &root, "ann");
    answer(
        &host,
        &mut http,
        host.token(0),
        400,
        &json!({"error": "no"}),
    );
    assert_eq!(host.state().resumed, 0);
    assert_eq!(host.state().replies[0].status, 503);
    assert_eq!(host.metric("check_failures.rejected"), 1);
    assert_eq!(host.metric("failure_mode_allowed"), 0);
    http.on_log();
    assert_eq!(host.calls(), 1, "nothing reserved, nothing to release");
}

#[test]
fn answers_for_tokens_nobody_owns_are_ignored_and_counted() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(0, "deny"));
    let mut http = request(&host, &root, "ann");
    let token = host.token(0);
    answer(&host, &mut http, token + 1, 200, &allowed());
    assert_eq!(host.state().resumed, 0, "still waiting for its own answer");
    answer(&host, &mut root, 12345, 200, &applied(1));
    assert_eq!(host.metric("callouts_unknown"), 2);
    answer(&host, &mut http, token, 200, &allowed());
    assert_eq!(host.state().resumed, 1);
}

#[test]
fn a_new_configuration_takes_over_the_queued_reports() {
    let host = Rc::new(FakeHost::default());
    let mut old = root(&host, 1, &config(0, "allow"));
    let mut http = request(&host, &old, "ann");
    answer(&host, &mut http, host.token(0), 200, &allowed());
    respond_and_end(&host, &mut http, 30);
    old.on_tick();
    let first = host.call_json(1)["reports"][0]["id"].clone();
    // The report call is in flight when a new configuration replaces the old one.
    let mut new = root(&host, 3, &config(0, "deny"));
    assert_eq!(
        host.state().tick_ms,
        1000,
        "the new root context's heartbeat"
    );
    assert!(old.on_done(), "another root context carries on");
    // Its heartbeat ticks (no new traffic needed).
    // The old root context's call is never answered: past its deadline the new one sends the
    // same report again, with the same id.
    host.state().now_ms += 60_000;
    new.on_tick();
    host.state().now_ms += 300; // the backoff of a failed call
    new.on_tick();
    assert_eq!(host.calls(), 3);
    assert_eq!(host.call_json(2)["reports"][0]["id"], first);
    answer(&host, &mut new, host.token(2), 200, &applied(1));
    assert_eq!(host.metric("reports.sent"), 1);
    assert_eq!(host.metric("report_queue"), 0);
}

#[test]
fn the_last_root_context_sends_what_is_queued_before_it_is_done() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(0, "allow"));
    let mut http = request(&host, &root, "ann");
    answer(&host, &mut http, host.token(0), 200, &allowed());
    respond_and_end(&host, &mut http, 30);
    assert!(!root.on_done(), "waits for the queue");
    assert_eq!(host.call_path(1), "/v1/report");
    answer(&host, &mut root, host.token(1), 200, &applied(1));
    root.on_tick();
    assert!(host.state().done);
    assert_eq!(host.metric("reports.sent"), 1);
}

#[test]
fn an_injected_stream_reaches_the_client_without_the_usage_it_did_not_ask_for() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(0, "allow"));
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-user", "ann"),
    ]);
    let body = br#"{"model":"m","stream":true}"#.to_vec();
    let len = body.len();
    host.state().request_body = body;
    let mut http = root.http();
    assert_eq!(http.on_http_request_headers(3, false), Action::Continue);
    assert_eq!(http.on_http_request_body(len, true), Action::Pause);
    let sent: Value = serde_json::from_slice(&host.state().request_body).unwrap();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "the plugin asked"
    );
    answer(&host, &mut http, host.token(0), 200, &allowed());
    host.state().response_headers = pairs(&[
        (":status", "200"),
        ("content-type", "text/event-stream"),
        ("content-length", "999"),
    ]);
    assert_eq!(http.on_http_response_headers(3, false), Action::Continue);
    assert_eq!(host.response_headers().get("content-length"), None);
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n"
    );
    // Two chunks, the second starting inside the usage event.
    let (a, b) = stream.as_bytes().split_at(70);
    let mut received = Vec::new();
    for (chunk, end) in [(a, false), (b, true)] {
        host.state().response_body = chunk.to_vec();
        assert_eq!(
            http.on_http_response_body(chunk.len(), end),
            Action::Continue
        );
        received.extend_from_slice(&host.state().response_body);
    }
    assert_eq!(
        String::from_utf8(received).unwrap(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"
    );
    http.on_log();
    root.on_tick();
    assert_eq!(
        host.call_json(1)["reports"][0]["tokens"],
        7,
        "charged from what was sent"
    );
}

/// A body ended by trailers was never read whole: its model is unknown, and a model key counts
/// the request under `(unreadable)` rather than letting it pass unlimited.
#[test]
fn a_body_ended_by_trailers_is_counted_under_the_unreadable_model() {
    let host = Rc::new(FakeHost::default());
    let config = json!({
        "service": {"cluster": "rl"},
        "limits": [{"name": "model", "key": "{{llm.model}}", "tokens": 1000, "window": "1h"}]
    });
    let root = root(&host, 1, &config);
    host.state().request_headers = pairs(&[(":method", "POST"), (":path", "/v1/chat/completions")]);
    let body = br#"{"model":"gpt-4o"}"#.to_vec();
    let len = body.len();
    host.state().request_body = body;
    let mut http = root.http();
    assert_eq!(http.on_http_request_headers(2, false), Action::Continue);
    assert_eq!(http.on_http_request_body(len, false), Action::Pause);
    assert_eq!(http.on_http_request_trailers(1), Action::Pause);
    assert_eq!(
        host.call_json(0)["descriptors"][0]["value"],
        crate::template::UNREADABLE_MODEL
    );
}

/// Bytes that are not UTF-8 in every header and property the plugin reads: proxy-wasm's string
/// getters would panic on them (a trapped VM fails every route). They are data: keyed by their
/// bytes, matching no condition, and the request is still checked, served and charged.
#[test]
fn header_bytes_that_are_not_utf8_are_data() {
    let host = Rc::new(FakeHost::default());
    let config = json!({
        "service": {"cluster": "rl"},
        "matches": [{"headers": {"x-route": {"present": true}}}],
        "client_ip": {"header": "x-forwarded-for", "trusted_hops": 1},
        "consumer_header": "x-consumer",
        "limits": [
            {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"},
            {"name": "auth", "key": "{{request.headers.authorization}}", "tokens": 1000, "window": "1h"},
            {"name": "query", "key": "{{request.query.k}}", "tokens": 1000, "window": "1h"},
            {"name": "cookie", "key": "{{request.cookies.sid}}", "tokens": 1000, "window": "1h"},
            {"name": "consumer", "key": "{{consumer}}", "tokens": 1000, "window": "1h"},
            {"name": "ip", "key": "{{source.ip}}", "tokens": 1000, "window": "1h"},
            {"name": "where", "key": "{{request.host}}{{request.method}}{{request.path}}", "tokens": 1000, "window": "1h"},
            {"name": "prop", "key": "{{xds.cluster_name}}", "tokens": 1000, "window": "1h"},
            {"name": "tier", "key": "{{request.headers.x-tier}}", "values": [
                {"match": "free", "tokens": 10, "window": "1h"},
                {"match": "*", "tokens": 1000, "window": "1h"}]},
            {"name": "free-only", "key": "", "tokens": 5, "window": "1h",
             "when": {"headers": {"x-tier": {"regex": ".*"}}}}
        ]
    });
    let mut root = root(&host, 1, &config);
    let junk = |prefix: &str| [prefix.as_bytes(), b"\xff\xfe\x80"].concat();
    host.state().request_headers = vec![
        (":method".into(), junk("POST")),
        (
            ":path".into(),
            [b"/v1/\xff?k=".as_slice(), &junk("q")].concat(),
        ),
        (":authority".into(), junk("llm")),
        ("x-route".into(), junk("r")),
        ("x-user".into(), junk("ann")),
        ("authorization".into(), junk("Bearer sk-")),
        ("cookie".into(), [b"sid=".as_slice(), &junk("c")].concat()),
        ("x-consumer".into(), junk("team")),
        // The client's own entry is junk, the trusted proxy's is the address.
        (
            "x-forwarded-for".into(),
            [junk("6.6.6.6").as_slice(), b", 1.2.3.4"].concat(),
        ),
        ("x-tier".into(), junk("free")),
        ("content-length".into(), junk("12")),
    ];
    host.state()
        .properties
        .insert("xds.cluster_name".into(), junk("openai"));
    let mut http = root.http();
    assert_eq!(http.on_http_request_headers(11, true), Action::Pause);
    let check = host.call_json(0);
    let values: Vec<(String, String)> = check["descriptors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["limit"].as_str().unwrap().to_string(),
                d["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let value = |limit: &str| {
        values
            .iter()
            .find(|(l, _)| l == limit)
            .map(|(_, v)| v.clone())
    };
    // Keyed by their bytes, never dropped.
    assert_eq!(value("user").as_deref(), Some("\0ann\\xff\\xfe\\x80"));
    assert!(crate::text::is_opaque(&value("auth").unwrap()));
    assert!(crate::text::is_opaque(&value("consumer").unwrap()));
    assert!(crate::text::is_opaque(&value("prop").unwrap()));
    assert!(value("where").is_some());
    // The query and cookie are read from their headers' bytes: the junk elsewhere in the path
    // changes nothing, the value keeps its own.
    assert_eq!(value("query").as_deref(), Some("\0q\\xff\\xfe\\x80"));
    assert_eq!(value("cookie").as_deref(), Some("\0c\\xff\\xfe\\x80"));
    assert_eq!(value("ip").as_deref(), Some("1.2.3.4"));
    // As a condition it matches nothing: not the free tier, and not `when`'s regex.
    let tier = check["descriptors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["limit"] == "tier")
        .unwrap();
    assert_eq!(tier["rates"][0]["tokens"], 1000, "the `*` rule, not `free`");
    assert_eq!(value("free-only"), None);
    answer(&host, &mut http, host.token(0), 200, &allowed());
    assert_eq!(host.state().resumed, 1);
    // An upstream's bytes: a status, a type and an encoding that are not UTF-8.
    host.state().response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), junk("application/json")),
        ("x-other".into(), junk("x")),
    ];
    let body = json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        .to_string()
        .into_bytes();
    let len = body.len();
    host.state().response_body = body;
    assert_eq!(http.on_http_response_headers(3, false), Action::Continue);
    assert_eq!(http.on_http_response_body(len, true), Action::Continue);
    http.on_log();
    root.on_tick();
    assert_eq!(host.call_json(1)["reports"][0]["tokens"], 3);
}

/// A response whose `:status` is not UTF-8 (or not a number) is no 2xx: nothing is read, and
/// the request is charged as an upstream error would be.
#[test]
fn an_unreadable_status_is_not_a_success() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(0, "allow"));
    let mut http = request(&host, &root, "ann");
    answer(&host, &mut http, host.token(0), 200, &allowed());
    host.state().response_headers = vec![(":status".into(), b"2\xff0".to_vec())];
    assert_eq!(http.on_http_response_headers(1, true), Action::Continue);
    http.on_log();
    root.on_tick();
    assert_eq!(
        host.calls(),
        1,
        "no usage, nothing reserved: nothing to report"
    );
}

/// A client that leaves after admission and before any response is charged its reservation:
/// the upstream saw the request and may bill it whole.
#[test]
fn a_client_gone_before_the_response_is_charged_its_reservation() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &config(50, "allow"));
    let mut http = request(&host, &root, "ann");
    answer(&host, &mut http, host.token(0), 200, &allowed());
    http.on_log();
    root.on_tick();
    // Charged exactly what was reserved: the reservation stands, nothing is refunded; the
    // report only tells the spend ledger what the request used.
    assert_eq!(host.calls(), 2);
    let report = &host.call_json(1)["reports"][0];
    assert_eq!(
        (report["tokens"].clone(), report["reserved"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(report["spend"], json!([{"requests": 1, "tokens": 50}]));
    assert_eq!(host.metric("usage.abandoned"), 1);
    assert_eq!(host.metric("usage.upstream_error"), 0);
}

/// A streaming chat request of `root` for `ann`, its body `body`, admitted with 950 left.
fn streaming(host: &Rc<FakeHost>, root: &Root, body: &str) -> Http {
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-user", "ann"),
    ]);
    host.state().request_body = body.as_bytes().to_vec();
    let mut http = root.http();
    assert_eq!(http.on_http_request_headers(3, false), Action::Continue);
    assert_eq!(http.on_http_request_body(body.len(), true), Action::Pause);
    answer(host, &mut http, host.token(0), 200, &allowed());
    host.state().response_headers =
        pairs(&[(":status", "200"), ("content-type", "text/event-stream")]);
    assert_eq!(http.on_http_response_headers(2, false), Action::Continue);
    http
}

/// One chunk through the stream at `now_ms`: what the client receives of it.
fn chunk(host: &FakeHost, http: &mut Http, bytes: &[u8], now_ms: u64) -> String {
    host.state().now_ms = now_ms;
    host.state().response_body = bytes.to_vec();
    assert_eq!(
        http.on_http_response_body(bytes.len(), false),
        Action::Continue
    );
    String::from_utf8(std::mem::take(&mut host.state().response_body)).unwrap()
}

/// An event of 400 bytes of text: 100 tokens by the estimate.
fn hundred_tokens() -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(400)
    )
}

/// `stream_cutoff`: the stream passes the 950 tokens the check reported left in its tenth
/// event (with the prompt's estimate), so it ends there in OpenAI's shape; what follows is
/// dropped, the upstream reset once the drain is over, and the charge is what was delivered.
#[test]
fn a_stream_past_its_budget_ends_in_its_shape_and_is_charged_what_it_delivered() {
    let host = Rc::new(FakeHost::default());
    let mut c = config(0, "allow");
    c["stream_cutoff"] = json!(true);
    c["stream_drain_ms"] = json!(1000);
    let mut root = root(&host, 1, &c);
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let mut http = streaming(&host, &root, body);
    let event = hundred_tokens();
    for i in 0..9 {
        assert_eq!(chunk(&host, &mut http, event.as_bytes(), 100 + i), event);
    }
    let last = chunk(&host, &mut http, event.as_bytes(), 200);
    let ending = last
        .strip_prefix(event.as_str())
        .expect("the event is delivered");
    let events: Vec<&str> = ending.trim_end().split("\n\n").collect();
    assert_eq!(events.len(), 3, "{ending}");
    let finish: Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage: Value = serde_json::from_str(&events[1]["data: ".len()..]).unwrap();
    assert_eq!(
        usage["usage"]["completion_tokens"], 1000,
        "the client asked"
    );
    assert_eq!(events[2], "data: [DONE]");
    assert_eq!(host.metric("streams_cut"), 1);

    assert_eq!(chunk(&host, &mut http, event.as_bytes(), 1100), "");
    assert_eq!(host.state().resets, 0, "still draining");
    assert_eq!(chunk(&host, &mut http, event.as_bytes(), 1200), "");
    assert_eq!(chunk(&host, &mut http, event.as_bytes(), 1300), "");
    assert_eq!(host.state().resets, 1, "reset once, after the drain");
    assert_eq!(host.metric("streams_reset"), 1);
    http.on_log();
    root.on_tick();
    let report = &host.call_json(1)["reports"][0];
    let prompt = (body.len() as u64).div_ceil(4);
    assert_eq!(report["tokens"], prompt + 1000, "what was delivered");
    assert!(
        report["tokens"].as_u64().unwrap() <= 950 + 100,
        "the budget plus one slice"
    );
}

/// A stream the plugin asked usage of is rewritten: a chunk that passes the budget ends after
/// its last whole event (its unfinished one is dropped), without the usage the client did not
/// ask for.
#[test]
fn a_rewritten_stream_ends_after_its_last_whole_event() {
    let host = Rc::new(FakeHost::default());
    let mut c = config(0, "allow");
    c["stream_cutoff"] = json!(true);
    let mut root = root(&host, 1, &c);
    let mut http = streaming(&host, &root, r#"{"model":"m","stream":true}"#);
    let event = hundred_tokens();
    let five = event.repeat(5);
    assert_eq!(chunk(&host, &mut http, five.as_bytes(), 1), five);
    let partial = format!("{five}{}", &event[..50]);
    let got = chunk(&host, &mut http, partial.as_bytes(), 2);
    let ending = got.strip_prefix(five.as_str()).expect("five whole events");
    assert!(ending.contains("\"finish_reason\":\"length\""), "{ending}");
    assert!(!ending.contains("usage"), "{ending}");
    assert!(ending.ends_with("data: [DONE]\n\n"), "{ending}");
    http.on_log();
    root.on_tick();
    assert_eq!(host.metric("streams_cut"), 1);
}

/// Without `stream_cutoff` (and no trimmed grant) a stream past its budget is not touched.
#[test]
fn without_a_cutoff_a_stream_is_never_ended() {
    let host = Rc::new(FakeHost::default());
    let root = root(&host, 1, &config(0, "allow"));
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let mut http = streaming(&host, &root, body);
    let event = hundred_tokens();
    for i in 0..20 {
        assert_eq!(chunk(&host, &mut http, event.as_bytes(), i), event);
    }
    assert_eq!(host.metric("streams_cut"), 0);
}

fn leasing(reserve: u64) -> Value {
    assert!(reserve > 0, "a lease needs a reservation");
    let mut c = config(reserve, "deny");
    c["service"]["admission"] = json!("lease");
    c
}

fn lease_granted(tokens: u64, ttl_ms: u64) -> Value {
    json!({"allowed": true, "limits": [], "lease": {"granted": {"tokens": tokens}, "reserved_at_ms": 5000, "ttl_ms": ttl_ms, "room": {"tokens": 100_000}}})
}

/// A request checked as usual wakes the root context, which asks for a lease in the
/// background; later requests for the key are admitted with no call, report against the
/// lease's window, and the lease's end gives back what they did not take.
#[test]
fn a_lease_admits_without_a_check_and_its_end_gives_back_what_was_not_taken() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &leasing(100));
    host.state().now_ms = 1_000;
    let mut first = request(&host, &root, "ann");
    answer(&host, &mut first, host.token(0), 200, &allowed());
    assert_eq!(
        host.state().tick_ms,
        1,
        "the ask is due: the root context is woken"
    );
    root.on_tick();
    let ask = host.call_json(1);
    assert_eq!(host.call_path(1), "/v1/check");
    assert_eq!(
        (ask["reserve"].clone(), ask["lease"]["tokens"].clone()),
        (json!(0), json!(6_400))
    );
    assert_eq!(ask["descriptors"][0]["value"], "ann");
    answer(
        &host,
        &mut root,
        host.token(1),
        200,
        &lease_granted(6_400, 2_000),
    );
    assert_eq!(
        (host.metric("leases.granted"), host.metric("leases.held")),
        (1, 1)
    );
    // Admitted with no call, charged its usage against its reservation, in the lease's window.
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-user", "ann"),
    ]);
    let mut second = root.http();
    assert_eq!(second.on_http_request_headers(3, true), Action::Continue);
    assert_eq!((host.calls(), host.metric("leases.admitted")), (2, 1));
    respond_and_end(&host, &mut second, 30);
    respond_and_end(&host, &mut first, 20);
    // Another key has no lease: checked.
    let _bob = request(&host, &root, "bob");
    assert_eq!(host.call_json(2)["descriptors"][0]["value"], "bob");
    // The lease expires (counted from when its ask left, at 1,000): no more local admission,
    // and its unused part is given back in its window.
    host.state().now_ms = 3_000;
    let _third = request(&host, &root, "ann");
    assert_eq!(host.call_json(3)["reserve"], 100, "checked again");
    root.on_tick();
    let reports: Vec<Value> = (4..host.calls())
        .filter(|&i| host.call_path(i) == "/v1/report")
        .flat_map(|i| host.call_json(i)["reports"].as_array().cloned().unwrap())
        .collect();
    // In the lease's window: ann's requests gave back 70 (30 of 100, under the lease) and 80
    // (20 of 100, checked), and the lease's end 6,300 (6,400 less the 100 taken): merged.
    let given_back: u64 = reports
        .iter()
        .filter(|r| r["reserved_at_ms"] == 5_000 && r["tokens"] == 0)
        .map(|r| r["reserved"].as_u64().unwrap())
        .sum();
    assert_eq!(given_back, 70 + 80 + 6_300, "{reports:?}");
    assert_eq!(host.metric("leases.held"), 0);
}

/// An ask whose answer never comes (or cannot be read) is released by a report naming it: the
/// service gives the lease back only if it took it.
#[test]
fn a_lease_ask_without_an_answer_is_released() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &leasing(10));
    host.state().now_ms = 1_000;
    let mut first = request(&host, &root, "ann");
    answer(&host, &mut first, host.token(0), 200, &allowed());
    root.on_tick();
    let id = host.call_json(1)["lease"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    answer(&host, &mut root, host.token(1), 504, &json!({}));
    assert_eq!(host.metric("leases.failed"), 1);
    root.on_tick();
    let report = &host.call_json(2)["reports"][0];
    assert_eq!(report["release"], json!(id));
    assert_eq!(
        (report["tokens"].clone(), report["reserved"].clone()),
        (json!(0), json!(640))
    );
    // Checked again for a while, then asked again.
    let _again = request(&host, &root, "ann");
    root.on_tick();
    assert!((3..host.calls()).all(|i| host.call_json(i).get("lease").is_none()));
}

/// A lease granted by one service never admits for another: a new configuration naming
/// another cluster forgets the VM's leases (the old service keeps what they took).
#[test]
fn leases_of_one_service_never_admit_for_another() {
    let host = Rc::new(FakeHost::default());
    let mut root1 = root(&host, 1, &leasing(100));
    let mut first = request(&host, &root1, "ann");
    answer(&host, &mut first, host.token(0), 200, &allowed());
    root1.on_tick();
    answer(
        &host,
        &mut root1,
        host.token(1),
        200,
        &lease_granted(6_400, 60_000),
    );
    assert_eq!(host.metric("leases.held"), 1);
    let mut other = leasing(100);
    other["service"]["cluster"] = json!("rl-2");
    let root2 = root(&host, 2, &other);
    let _second = request(&host, &root2, "ann");
    assert_eq!(
        host.call_json(2)["reserve"],
        100,
        "checked by the new service"
    );
}

/// The VM stops with an ask in flight and a lease held: the ask is released by id and the
/// lease's unused part given back, before the VM goes.
#[test]
fn a_stopping_vm_gives_back_its_leases_and_releases_its_asks() {
    let host = Rc::new(FakeHost::default());
    let mut root = root(&host, 1, &leasing(100));
    let mut first = request(&host, &root, "ann");
    answer(&host, &mut first, host.token(0), 200, &allowed());
    root.on_tick();
    answer(
        &host,
        &mut root,
        host.token(1),
        200,
        &lease_granted(6_400, 60_000),
    );
    let mut bob = request(&host, &root, "bob");
    answer(&host, &mut bob, host.token(2), 200, &allowed());
    root.on_tick();
    let ask = host.call_json(3);
    let bob_ask = ask["lease"]["id"].as_str().unwrap().to_string();
    assert!(!root.on_done(), "reports to send first");
    let reports: Vec<Value> = (4..host.calls())
        .filter(|&i| host.call_path(i) == "/v1/report")
        .flat_map(|i| host.call_json(i)["reports"].as_array().cloned().unwrap())
        .collect();
    assert!(
        reports
            .iter()
            .any(|r| r["release"] == json!(bob_ask) && r["reserved"] == 6_400),
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|r| r["descriptors"][0]["value"] == "ann" && r["reserved"] == 6_400),
        "{reports:?}"
    );
    // The late answer installs nothing.
    answer(
        &host,
        &mut root,
        host.token(3),
        200,
        &lease_granted(6_400, 60_000),
    );
    assert_eq!(host.metric("leases.held"), 0);
}

/// A request admitted under a lease, as a hot key's requests are: what it asks of the host.
/// Every host call crosses from Wasm into Envoy; this counts them so that the path stays lean.
#[test]
fn a_leased_request_makes_few_host_calls() {
    let host = Rc::new(FakeHost::default());
    let mut c = leasing(100);
    c["matches"] = json!([{"path": {"prefix": "/v1/"}}]);
    c["reserve"] = json!({"tokens": "max_tokens"});
    let mut root = root(&host, 1, &c);
    host.state().now_ms = 1_000;
    let mut first = request(&host, &root, "ann");
    answer(&host, &mut first, host.token(0), 200, &allowed());
    root.on_tick();
    let asked = host.call_json(1)["lease"]["tokens"].as_u64().unwrap();
    answer(
        &host,
        &mut root,
        host.token(1),
        200,
        &lease_granted(asked, 2_000),
    );
    respond_and_end(&host, &mut first, 20);
    root.on_tick();
    let body = br#"{"model":"m","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "llm.test"),
        ("content-type", "application/json"),
        ("content-length", "73"),
        ("accept-encoding", "gzip, deflate"),
        ("x-user", "ann"),
    ]);
    host.state().request_body = body.to_vec();
    host.take_host_calls();
    let mut leased = root.http();
    assert_eq!(leased.on_http_request_headers(5, false), Action::Continue);
    assert_eq!(
        leased.on_http_request_body(body.len(), true),
        Action::Continue
    );
    respond_and_end(&host, &mut leased, 30);
    let calls = host.take_host_calls();
    assert_eq!(host.metric("leases.admitted"), 1);
    // The request's headers, read as one map; accept-encoding and content-length removed (as
    // an SDK sends them: a request without them removes nothing); the body read; the
    // response's headers as one map; the body chunk; three counters; two clock reads; the
    // report timer.
    let expected = [
        ("request_headers", 1),
        ("remove_request_header", 2),
        ("request_body", 1),
        ("response_headers", 1),
        ("response_body", 1),
        ("add_to_metric", 3),
        ("now_ms", 2),
        ("set_tick_ms", 1),
    ];
    let mut made: Vec<(&str, usize)> = calls.into_iter().collect();
    made.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(made, expected);
    let left: Vec<String> = host
        .state()
        .request_headers
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        !left
            .iter()
            .any(|k| k == "accept-encoding" || k == "content-length"),
        "{left:?}"
    );
    // A request without them removes nothing.
    host.state().request_headers = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-user", "ann"),
    ]);
    host.take_host_calls();
    let mut bare = root.http();
    assert_eq!(bare.on_http_request_headers(3, false), Action::Continue);
    assert_eq!(
        bare.on_http_request_body(body.len(), true),
        Action::Continue
    );
    assert_eq!(host.metric("leases.admitted"), 2);
    assert_eq!(host.take_host_calls().get("remove_request_header"), None);
}
