//! `make soak`: sustained load through Envoy + plugin + the rate-limit service, then proof that
//! every served token was charged exactly once and that nothing grew with the request count.
//!
//! For each store (memory, Redis): `users` users rotate over `requests` requests of known
//! usage (10 tokens, with a reservation of 20 refunded at settlement) on keep-alive
//! connections; then, once the plugin's queue is empty, each user's balance at the service must
//! equal 10 × the requests served to that user, no report may have been dropped or refused,
//! and the service's counters (memory) or Redis's keys must be O(users + plugin VMs).

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::envoy::{cluster, cluster_h2, Envoy};
use testkit::postgres::PostgresServer;
use testkit::redis::RedisServer;
use testkit::service::{mock_llm, Service};

use crate::load::{Call, Plan};
use crate::report::{Row, Section};
use crate::{addr, run};

/// Tokens every request uses, and what it reserves.
const USED: u64 = 10;
const RESERVED: u64 = 20;
/// Models the requests rotate over (the spend ledger's per-model totals are checked).
const MODELS: usize = 10;
/// A budget no soak can spend, in a window no soak crosses.
const BUDGET: u64 = 1_000_000_000_000;
const WINDOW_S: u64 = 365 * 86_400;

pub struct Soak {
    pub requests: u64,
    pub users: usize,
    pub max_counters: usize,
    pub connections: usize,
}

/// What one store's run showed.
pub struct Result {
    pub store: &'static str,
    pub served: u64,
    pub rps: f64,
    pub mismatched_users: usize,
    pub dropped: u64,
    pub refused: u64,
    pub service_rss_mib: f64,
    /// Counters in the memory store, or keys in Redis.
    pub keys: u64,
    pub redis_mib: Option<f64>,
}

impl Result {
    pub fn ok(&self, users: usize) -> bool {
        self.mismatched_users == 0
            && self.dropped == 0
            && self.refused == 0
            && self.keys <= 8 * users as u64 + 64
    }
}

fn metric(service: u16, name: &str) -> Option<f64> {
    let text = testkit::http::send(service, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `store`: `memory`, `redis`, or `redis + ledger` (the spend ledger in a real PostgreSQL,
/// whose per-user and per-model totals must equal what was served, exactly).
pub fn run_store(store: &'static str, soak: &Soak) -> Result {
    let redis = store.starts_with("redis").then(RedisServer::start);
    let postgres = store.ends_with("ledger").then(PostgresServer::start);
    let ledger_url = postgres.as_ref().map(PostgresServer::url);
    let max = soak.max_counters.to_string();
    let mut args = vec!["--max-counters", max.as_str()];
    let url;
    if let Some(r) = &redis {
        url = r.url();
        args.extend(["--store", "redis", "--redis-url", url.as_str()]);
    }
    if let Some(url) = &ledger_url {
        args.extend(["--ledger", url.as_str()]);
    }
    let svc = Service::start(&args, &[]);
    let llm = mock_llm();
    let config = json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 2000},
        "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": BUDGET, "window": WINDOW_S}],
        "reserve": {"tokens": "max_tokens"}
    });
    let envoy = Envoy::start(
        &config,
        &[
            cluster_h2("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let users: Vec<String> = (0..soak.users).map(|i| format!("soak-{i}")).collect();
    // Call `u * MODELS + m`: user `u` on model `m`.
    let calls: Vec<Call> = users
        .iter()
        .flat_map(|u| (0..MODELS).map(move |m| (u, format!("soak-model-{m}"))))
        .map(|(u, model)| {
            Call::post_json(
                "/v1/chat/completions",
                &[
                    ("x-user", u),
                    ("x-mock-prompt-tokens", "0"),
                    ("x-mock-completion-tokens", "10"),
                ],
                &json!({"model": model, "max_tokens": RESERVED, "messages": [{"role": "user", "content": "hi"}]}),
            )
        })
        .collect();
    let o = run(Plan {
        addr: addr(envoy.port),
        connections: soak.connections,
        duration: None,
        total: Some(soak.requests),
        warmup: Duration::ZERO,
        calls,
    });
    let served_by_user: Vec<u64> = o.served.chunks(MODELS).map(|c| c.iter().sum()).collect();
    // Reports are asynchronous: wait until every balance is what was served, or give up.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut mismatched = loop {
        let wrong = users
            .iter()
            .zip(&served_by_user)
            .filter(|(u, served)| {
                let left = svc.remaining("user", u).unwrap_or(BUDGET);
                BUDGET - left != **served * USED
            })
            .count();
        if wrong == 0 || Instant::now() > deadline {
            break wrong;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if postgres.is_some() {
        mismatched += ledger_mismatches(&svc, &users, &served_by_user, &o.served);
    }
    let keys = match &redis {
        Some(r) => testkit::redis::command(r.port, &["DBSIZE"])
            .ok()
            .and_then(|s| s.trim().trim_start_matches(':').parse().ok())
            .unwrap_or(u64::MAX),
        None => metric(svc.port, "ratelimit_memory_counters").unwrap_or(f64::MAX) as u64,
    };
    let redis_mib = redis.as_ref().and_then(|r| {
        let info = testkit::redis::command(r.port, &["INFO", "memory"]).ok()?;
        let line = info.lines().find(|l| l.starts_with("used_memory:"))?;
        Some(
            line.trim_start_matches("used_memory:")
                .trim()
                .parse::<f64>()
                .ok()?
                / 1048576.0,
        )
    });
    Result {
        store,
        served: o.served.iter().sum(),
        rps: o.rps(),
        mismatched_users: mismatched,
        dropped: envoy.metric("reports.dropped"),
        refused: envoy.metric("reports.failed"),
        service_rss_mib: testkit::rss_bytes(svc.pid()) as f64 / 1048576.0,
        keys,
        redis_mib,
    }
}

/// Users and models whose spend in the ledger (`GET /v1/spend`) differs from what was served.
fn ledger_mismatches(svc: &Service, users: &[String], by_user: &[u64], by_call: &[u64]) -> usize {
    let get = |group: &str| {
        testkit::http::send(
            svc.port,
            "GET",
            &format!("/v1/spend?group_by={group}&from=0"),
            &[],
            b"",
        )
        .json()["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let rows = get("value");
    let users_off = users
        .iter()
        .zip(by_user)
        .filter(|(u, served)| {
            let row = rows.iter().find(|r| r["value"] == u.as_str());
            let (tokens, requests) = row.map_or((0, 0), |r| {
                (
                    r["tokens"].as_u64().unwrap_or(0),
                    r["requests"].as_u64().unwrap_or(0),
                )
            });
            let off = (tokens, requests) != (**served * USED, **served);
            if off {
                eprintln!("ledger: {u}: {tokens} tokens, {requests} requests; served {served}");
            }
            off
        })
        .count();
    let rows = get("model");
    let models_off = (0..MODELS)
        .filter(|m| {
            let served: u64 = by_call.iter().skip(*m).step_by(MODELS).sum();
            let name = format!("soak-model-{m}");
            let row = rows.iter().find(|r| r["model"] == name.as_str());
            let tokens = row.map_or(0, |r| r["tokens"].as_u64().unwrap_or(0));
            if tokens != served * USED {
                eprintln!("ledger: {name}: {tokens} tokens; served {served}");
            }
            tokens != served * USED
        })
        .count();
    users_off + models_off
}

/// The soak as a table section.
pub fn section(soak: &Soak) -> (Section, bool) {
    let mut section = Section::new(
        &format!(
            "Sustained: {} requests per store, {} users, {} connections",
            soak.requests, soak.users, soak.connections
        ),
        &[
            "store",
            "served",
            "req/s",
            "balances exact",
            "reports dropped",
            "reports refused",
            "service RSS",
            "counters / Redis keys",
            "Redis memory",
        ],
    );
    let mut ok = true;
    for store in ["memory", "redis", "redis + ledger"] {
        let r = run_store(store, soak);
        ok &= r.ok(soak.users);
        section.push(Row::new(vec![
            r.store.into(),
            r.served.to_string(),
            format!("{:.0}", r.rps),
            if r.mismatched_users == 0 {
                "yes".into()
            } else {
                format!("no: {} users off", r.mismatched_users)
            },
            r.dropped.to_string(),
            r.refused.to_string(),
            format!("{:.1} MiB", r.service_rss_mib),
            r.keys.to_string(),
            r.redis_mib.map_or("–".into(), |m| format!("{m:.1} MiB")),
        ]));
    }
    section.note(format!(
        "Each request uses {USED} tokens after reserving {RESERVED}, on one of {MODELS} models; a balance is exact when the service charged {USED} × the requests it served to that user, and, with the spend ledger in PostgreSQL, when `/v1/spend` also says so for every user and every model. The memory store ran with --max-counters {}: report ids are remembered per plugin VM, not as counters, so the store's size is the users', whatever the request count.",
        soak.max_counters
    ));
    (section, ok)
}
