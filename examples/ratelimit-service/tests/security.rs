//! The service as an attacker on the cluster network meets it: without the API key nobody can
//! check, report (refund or charge) or read; connections that stall are closed while real
//! checks go on; the connection cap holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::http::{self, send};
use testkit::service::Service;

fn start(args: &[&str]) -> Service {
    Service::start_binary(
        PathBuf::from(env!("CARGO_BIN_EXE_ratelimit-service")),
        args,
        &[],
    )
}

const KEY_ONE: &str = "key-one-aaaaaaaaaaaa";
const KEY_TWO: &str = "key-two-bbbbbbbbbbbb";
const ADMIN: &str = "admin-cccccccccccccccc";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn metric(s: &Service, line: &str) -> u64 {
    let text = send(s.port, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The reproductions of the issue: an unauthenticated report that refunds a spent budget, and
/// one that charges a victim. With `--api-key` both are refused, and so is every other call
/// without the key; health, readiness and metrics stay open; reads take the admin token too.
#[test]
fn without_the_key_nobody_checks_reports_or_reads() {
    let s = start(&[
        "--api-key",
        &format!("{KEY_ONE},{KEY_TWO}"),
        "--admin-token",
        ADMIN,
    ]);
    let one = bearer(KEY_ONE);
    let two = bearer(KEY_TWO);
    let d = json!({"limit": "team", "value": "a", "rates": [{"tokens": 1000, "window_s": 3600}]});
    let check = json!({"descriptors": [d], "reserve": 1000, "id": "00000000000000aa-1"});
    let refused = http::post_json(s.port, "/v1/check", &[], &check);
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        refused.header("connection"),
        Some("close"),
        "no connection kept"
    );
    let wrong = bearer("key-one-aaaaaaaaaaab");
    for auth in [wrong.as_str(), "key-one-aaaaaaaaaaaa", "Basic a2V5", ""] {
        let r = http::post_json(s.port, "/v1/check", &[("authorization", auth)], &check);
        assert_eq!(r.status, 401, "{auth:?}");
    }
    // The key spends the whole budget (either key of a rotation works).
    let r = http::post_json(s.port, "/v1/check", &[("authorization", &one)], &check);
    assert_eq!((r.status, r.json()["allowed"].clone()), (200, json!(true)));
    let remaining = || {
        send(
            s.port,
            "GET",
            "/v1/quota?limit=team&value=a",
            &[("authorization", &two)],
            b"",
        )
        .json()["meters"][0]["remaining"]
            .as_u64()
    };
    assert_eq!(remaining(), Some(0));
    // A forged refund: a release of that reservation, and a report with a huge reservation.
    for forged in [
        json!({"reports": [{"id": "00000000000000aa-1", "descriptors": [d], "tokens": 0, "reserved": 1000, "release": "00000000000000aa-1"}]}),
        json!({"reports": [{"id": "00000000000000bb-1", "descriptors": [d], "tokens": 0, "reserved": 1000000, "reserved_at_ms": 1}]}),
    ] {
        let r = http::post_json(s.port, "/v1/report", &[], &forged);
        assert_eq!(r.status, 401);
    }
    assert_eq!(remaining(), Some(0), "a spent budget stays spent");
    // A forged charge against a victim.
    let victim =
        json!({"limit": "team", "value": "victim", "rates": [{"tokens": 1000, "window_s": 3600}]});
    let charge = json!({"reports": [{"id": "00000000000000cc-1", "descriptors": [victim], "tokens": 1000, "reserved": 0}]});
    assert_eq!(
        http::post_json(s.port, "/v1/report", &[], &charge).status,
        401
    );
    let r = http::post_json(
        s.port,
        "/v1/check",
        &[("authorization", &two)],
        &json!({"descriptors": [victim]}),
    );
    assert_eq!(r.json()["allowed"], true, "the victim was not charged");
    // ASM endpoints, reads and the console's data need a credential too.
    for (method, path) in [
        ("GET", "/ratelimit?ratelimit_keys=%5B%22a%22%5D"),
        ("POST", "/update_ratelimit_record"),
        ("GET", "/v1/quota?limit=team&value=a"),
        ("GET", "/v1/console/overview"),
        ("GET", "/v1/console/top"),
        ("GET", "/v1/console/denials"),
        ("GET", "/v1/console/search?value=a"),
    ] {
        assert_eq!(send(s.port, method, path, &[], b"{}").status, 401, "{path}");
    }
    let admin = bearer(ADMIN);
    for path in ["/v1/quota?limit=team&value=a", "/v1/console/top"] {
        let r = send(s.port, "GET", path, &[("authorization", &admin)], b"");
        assert_eq!(r.status, 200, "{path}: the admin token reads");
    }
    // The admin token does not check or report; an API key does not administer.
    assert_eq!(
        http::post_json(s.port, "/v1/check", &[("authorization", &admin)], &check).status,
        401
    );
    let grant = json!({"limit": "team", "value": "a", "amount": 500});
    assert_eq!(
        http::post_json(
            s.port,
            "/v1/admin/grant",
            &[("authorization", &one)],
            &grant
        )
        .status,
        401
    );
    // Open: health, readiness, metrics, and the console's page (it asks for the key).
    for path in ["/healthz", "/readyz", "/metrics", "/console"] {
        assert_eq!(send(s.port, "GET", path, &[], b"").status, 200, "{path}");
    }
    assert!(metric(&s, "ratelimit_unauthorized_total") >= 15);
}

/// Reads one HTTP response (or nothing) from `conn`; `None` when the server closed it.
fn read_some(conn: &mut TcpStream) -> Option<String> {
    let mut buf = [0u8; 4096];
    match conn.read(&mut buf) {
        Ok(0) => None,
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("{e}"),
    }
}

fn check_once(port: u16) -> u16 {
    let d = json!({"limit": "u", "value": "v", "rates": [{"tokens": 1000000, "window_s": 60}]});
    http::post_json(
        port,
        "/v1/check",
        &[],
        &json!({"descriptors": [d], "reserve": 1}),
    )
    .status
}

/// Silent connections, a trickled head, a body that stops halfway and an idle kept-alive
/// connection are each closed, while real checks keep being answered.
#[test]
fn stalled_connections_are_closed_while_checks_go_on() {
    let s = start(&[
        "--head-timeout",
        "1",
        "--body-timeout",
        "1",
        "--idle-timeout",
        "2",
    ]);
    let open = || {
        let c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        c
    };
    let silent: Vec<TcpStream> = (0..5).map(|_| open()).collect();
    let trickled: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut c = open();
            c.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    let halfway: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut c = open();
            c.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"descriptors\"")
                .unwrap();
            c
        })
        .collect();
    let mut kept = open();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert!(read_some(&mut kept).unwrap().starts_with("HTTP/1.1 200"));
    // Real checks go on meanwhile.
    let until = Instant::now() + Duration::from_secs(3);
    let mut answered = 0;
    while Instant::now() < until {
        assert_eq!(check_once(s.port), 200);
        answered += 1;
    }
    assert!(answered > 0);
    for mut c in silent.into_iter().chain(trickled) {
        assert_eq!(read_some(&mut c), None, "a stalled connection is closed");
    }
    for mut c in halfway {
        let answer = read_some(&mut c).unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        while read_some(&mut c).is_some() {}
    }
    assert_eq!(
        read_some(&mut kept),
        None,
        "an idle kept-alive connection is closed"
    );
    assert!(metric(&s, "ratelimit_connections_total{event=\"timed_out\"}") >= 6);
    assert_eq!(
        metric(&s, "ratelimit_connections_total{event=\"body_timed_out\"}"),
        5
    );
}

/// At most `--max-connections` at once: one more waits in the backlog until a stalled
/// connection is closed, and is then served.
#[test]
fn the_connection_cap_holds_and_recovers() {
    let s = start(&["--max-connections", "3", "--head-timeout", "2"]);
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", s.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut waiting = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 256];
    let early = waiting.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "served past the cap: {early:?}"
    );
    waiting
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let answer = read_some(&mut waiting).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(silent);
}
