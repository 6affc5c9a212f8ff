//! The operator console as an operator sees it: known traffic through Envoy, the plugin and the
//! service, then the page rendered by a headless Chromium (Debian's `chromium`, which `make
//! test` installs), and the rendered DOM read back: the top consumer, its numbers, its
//! denial and its budget alerts are on the page. A screenshot is kept in `target/console/console.png`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::process::Command;

use serde_json::json;
use testkit::envoy::{cluster, Envoy};
use testkit::http;
use testkit::service::Service;

/// Rendered DOM of `url` after its script has run, and a screenshot at `png`.
fn render(url: &str, png: &std::path::Path) -> String {
    let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
    let base = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
        "--window-size=1400,1100",
    ];
    let shot = Command::new(&chromium)
        .args(base)
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("{chromium}: {e} (make test installs Debian's chromium)"));
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let dom = Command::new(&chromium)
        .args(base)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    String::from_utf8(dom.stdout).unwrap()
}

/// The rows of the table body `id`, each as its cells' texts.
fn rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<tbody id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no #{id} in\n{dom}"));
    let body = &dom[start..start + dom[start..].find("</tbody>").unwrap()];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|c| {
                    let text = &c[c.find('>').unwrap() + 1..];
                    let text = &text[..text.find("</td>").unwrap_or(text.len())];
                    // Cells hold text only (the page never parses values as HTML).
                    text.split('<')
                        .next()
                        .unwrap_or("")
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&amp;", "&")
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_console_shows_the_top_consumer_and_its_denial() {
    let svc = Service::start(&[], &[]);
    let up = http::uses_max_tokens();
    let config = json!({
        "service": {"cluster": "ratelimit"},
        "limits": [{"name": "per-user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h",
                    "alerts": [0.5, 0.8]}],
        "reserve": {"tokens": "max_tokens"}
    });
    let e = Envoy::start(
        &config,
        &[cluster("ratelimit", svc.port), cluster("upstream", up.port)],
    );
    let ask = |user: &str, max_tokens: u64| {
        http::post_json(
            e.port,
            "/v1/chat/completions",
            &[("x-user", user)],
            &json!({"model": "m", "max_tokens": max_tokens}),
        )
        .status
    };
    // alice spends 900 of 1,000 and is then denied; bob and a key that is HTML spend a little.
    assert_eq!(ask("alice", 600), 200);
    assert_eq!(ask("alice", 300), 200);
    assert_eq!(ask("bob", 40), 200);
    assert_eq!(ask("<img src=x onerror=alert(1)>", 7), 200);
    svc.await_remaining("per-user", "alice", 100);
    svc.await_remaining("per-user", "bob", 960);
    assert_eq!(ask("alice", 500), 429);

    let dir = testkit::repo().join("target/console");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("console.png");
    let _ = std::fs::remove_file(&png);
    let dom = render(&format!("http://127.0.0.1:{}/console", svc.port), &png);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page's script did not load its data:\n{dom}"
    );

    let top = rows(&dom, "top");
    // limit, key, used, remaining, budget, reset, counted
    assert_eq!(
        top[0][..5],
        ["per-user", "alice", "900", "100", "1,000"],
        "{top:?}"
    );
    assert_eq!(top[0][6], "900 tokens");
    assert_eq!(top[1][..4], ["per-user", "bob", "40", "960"], "{top:?}");
    assert!(
        top.iter().any(|r| r[1] == "<img src=x onerror=alert(1)>"),
        "a key that is HTML is shown as text: {top:?}"
    );
    assert!(
        !dom.contains("<img src=\"x\""),
        "no element was made from a key value"
    );
    let denials = rows(&dom, "denials");
    assert_eq!(denials[0][1..3], ["per-user", "alice"], "{denials:?}");
    assert!(
        denials[0][3].contains("100 tokens left of 1000 tokens, 500 tokens needed"),
        "{denials:?}"
    );
    // alice's reports reached 600 (0.5) and 900 (0.8): newest first.
    let alerts = rows(&dom, "alerts");
    assert_eq!(
        alerts.len(),
        2,
        "{alerts:?}\n{}",
        http::send(svc.port, "GET", "/metrics", &[], b"").text()
    );
    assert_eq!(
        alerts[0][1..6],
        ["per-user", "alice", "80%", "900 tokens", "1000 tokens"],
        "{alerts:?}"
    );
    // Her two reports may arrive merged in one batch: then both are raised at 900.
    assert_eq!(alerts[1][1..4], ["per-user", "alice", "50%"], "{alerts:?}");
    assert!(
        ["600 tokens", "900 tokens"].contains(&alerts[1][4].as_str()),
        "{alerts:?}"
    );
    assert!(
        alerts[0][6].ends_with(":00:00Z"),
        "the window's end: {alerts:?}"
    );
    assert!(
        std::fs::metadata(&png).unwrap().len() > 10_000,
        "a screenshot was kept"
    );
}

/// "This month": the spend ledger's sums per limit and key, with the models inside, read from
/// a real PostgreSQL; key values are text on the page, never HTML.
#[test]
fn the_console_shows_this_months_spend_per_key_and_model() {
    let pg = testkit::postgres::PostgresServer::start();
    let svc = Service::start(&["--ledger", &pg.url()], &[]);
    let team = |v: &str| {
        json!({"limit": "team", "value": v, "currency": "USD",
               "rates": [{"tokens": 500_000_000u64, "window_s": 2_678_400,
                          "calendar": {"period": "month", "timezone": "UTC"}}]})
    };
    let reports: Vec<serde_json::Value> = [
        ("red", "gpt-4o", 1_000, 2_500_000u64),
        ("red", "gpt-4o", 1_000, 2_500_000),
        ("red", "claude-sonnet", 500, 1_000_000),
        ("<b>blue</b>", "gpt-4o", 100, 250_000),
    ]
    .iter()
    .enumerate()
    .map(|(i, (team_name, model, tokens, micros))| {
        json!({"id": format!("00000000000000cc-{}", i + 1), "descriptors": [team(team_name)],
               "tokens": tokens, "cost": micros,
               "spend": [{"model": model, "requests": 1, "tokens": tokens, "cost": micros}]})
    })
    .collect();
    let r = http::post_json(svc.port, "/v1/report", &[], &json!({"reports": reports}));
    assert_eq!(r.json()["accepted"], 4);

    let dir = testkit::repo().join("target/console");
    std::fs::create_dir_all(&dir).unwrap();
    let dom = render(
        &format!("http://127.0.0.1:{}/console", svc.port),
        &dir.join("console-month.png"),
    );
    let month = rows(&dom, "month");
    assert_eq!(
        month[0],
        [
            "team",
            "red",
            "3",
            "2,500",
            "6.00 USD",
            "gpt-4o: 5.00 USD · claude-sonnet: 1.00 USD"
        ],
        "{month:?}"
    );
    assert_eq!(
        month[1][..5],
        ["team", "<b>blue</b>", "1", "100", "0.25 USD"]
    );
    assert!(
        !dom.contains("<b>blue</b>"),
        "a key value is text, not HTML"
    );
}
