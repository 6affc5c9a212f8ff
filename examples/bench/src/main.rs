//! `make bench`: what the plugin and the service cost, measured in one run on loopback.
//!
//! 1. Envoy alone versus Envoy + plugin + service (memory), same upstream (the mock LLM), same
//!    load: requests/s, p50/p99 and the ratio; limited, unmatched and streaming (SSE) requests.
//! 2. The service alone: checks/s and reports/s, memory and Redis, at several concurrencies.
//! 3. The `.wasm` size; Envoy's resident memory and the plugin VM's memory after the load.
//! 4. A 100 MB SSE response through the plugin: the VM's memory before and after.
//! 5. Accuracy: 50 concurrent requests of 100 tokens on a budget of 1,000, with and without
//!    reservations; and under quota leases over two Envoy workers.
//!
//! Quota leases: a hot key (one user) limited with `admission: lease`, against Envoy alone,
//! and the checks that reached the service for the requests served.
//!
//! A/B runs alternate, several rounds, and medians are reported (the machine is shared and
//! noisy). Results: a table on stdout, `target/bench/results.md` and `target/bench/chart.svg`.

mod load;
mod report;
mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use load::{Call, Outcome, Plan};
use report::{median, Row, Section};
use serde_json::{json, Value};
use testkit::envoy::{bootstrap, cluster, cluster_h2, plugin_wasm, Envoy};
use testkit::redis::RedisServer;
use testkit::service::{mock_llm, Service};

#[derive(Parser)]
#[command(about = "Measure the plugin's and the service's cost (see docs/src/performance.md)")]
struct Cli {
    /// A quick run that only checks the harness works (used by the tests).
    #[arg(long)]
    smoke: bool,
    /// Interleaved A/B rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per proxy run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections for the proxy runs.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Only the proxy and memory sections (for iterating on the plugin).
    #[arg(long)]
    proxy_only: bool,
    /// Only the service section (checks and reports straight to the service, per store).
    #[arg(long)]
    service_only: bool,
    /// Where the Markdown and the chart go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only the sustained run (`make soak`): exits 1 unless every balance is exact, nothing
    /// was dropped and the stores stayed bounded.
    #[arg(long)]
    soak: bool,
    /// Requests per store for the sustained run.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Users the sustained run rotates over.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// The memory store's --max-counters for the sustained run.
    #[arg(long, default_value_t = 1_000_000)]
    max_counters: usize,
}

struct Settings {
    rounds: usize,
    proxy: Duration,
    service: Duration,
    warmup: Duration,
    connections: usize,
    stream_bytes: u64,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

fn run(plan: Plan) -> Outcome {
    runtime().block_on(load::run(plan))
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

fn chat_calls(path: &str, stream: bool) -> Vec<Call> {
    let body = if stream {
        json!({"model": "bench", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hello"}]})
    } else {
        json!({"model": "bench", "messages": [{"role": "user", "content": "hello"}]})
    };
    users(32)
        .iter()
        .map(|u| Call::post_json(path, &[("x-user", u)], &body))
        .collect()
}

fn plugin_config(extra: Value) -> Value {
    let mut c = json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 1000},
        "matches": [{"path": {"prefix": "/v1/"}}],
        "limits": [{"name": "per-user", "key": "{{request.headers.x-user}}", "tokens": 1_000_000_000_000_000u64, "window": "1h"}]
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn proxy_section(s: &Settings, wasm_kib: u64) -> (Section, Section) {
    let llm = mock_llm();
    let svc = Service::start(&[], &[]);
    let alone = Envoy::start_without_plugin(&[cluster("upstream", llm.port)]);
    let plugin = Envoy::start(
        &plugin_config(json!({})),
        &[
            cluster_h2("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // The floor any Wasm filter pays: a plugin that does nothing (examples/noop-plugin).
    let noop_wasm = testkit::repo().join("target/wasm32-wasip1/release/noop_plugin.wasm");
    let noop = Envoy::try_start_bootstrap(&bootstrap(
        "",
        &[cluster("upstream", llm.port)],
        &noop_wasm,
        "127.0.0.1",
    ))
    .unwrap_or_else(|log| {
        panic!(
            "the no-op plugin ({}) did not load: {log}",
            noop_wasm.display()
        )
    });
    // The same plugin reading one request header ten times per request: what a host call that
    // hands bytes back costs.
    let noop_reads = Envoy::try_start_bootstrap(&bootstrap(
        "10",
        &[cluster("upstream", llm.port)],
        &noop_wasm,
        "127.0.0.1",
    ))
    .unwrap_or_else(|log| panic!("the no-op plugin did not load: {log}"));
    // Its own Envoy, so that the limited runs' report traffic cannot colour it.
    let plugin_idle = Envoy::start(
        &plugin_config(json!({})),
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    // Quota leases on a hot key, with a service of its own to count the checks that reach it.
    let lease_svc = Service::start(&[], &[]);
    let leasing = Envoy::start(
        &plugin_config(json!({
            "service": {"cluster": "ratelimit", "timeout_ms": 1000, "admission": "lease"},
            "reserve": {"tokens": "max_tokens"}
        })),
        &[
            cluster_h2("ratelimit", lease_svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let hot_key = {
        let body = json!({"model": "bench", "messages": [{"role": "user", "content": "hello"}]});
        vec![Call::post_json(
            "/v1/chat/completions",
            &[("x-user", "hot")],
            &body,
        )]
    };
    let rss_idle = (alone.rss_bytes(), plugin.rss_bytes());
    let scenarios: Vec<(&str, &Envoy, Vec<Call>)> = vec![
        (
            "Envoy alone",
            &alone,
            chat_calls("/v1/chat/completions", false),
        ),
        (
            "Envoy + empty Wasm plugin",
            &noop,
            chat_calls("/v1/chat/completions", false),
        ),
        (
            "Envoy + plugin, limited",
            &plugin,
            chat_calls("/v1/chat/completions", false),
        ),
        (
            "Envoy + plugin, not matched",
            &plugin_idle,
            chat_calls("/other/chat/completions", false),
        ),
        (
            "Envoy alone, SSE",
            &alone,
            chat_calls("/v1/chat/completions", true),
        ),
        (
            "Envoy + plugin, limited, SSE",
            &plugin,
            chat_calls("/v1/chat/completions", true),
        ),
        (
            "Envoy + plugin, limited, leases, hot key",
            &leasing,
            hot_key,
        ),
        (
            "Envoy + empty Wasm plugin reading a header 10 times",
            &noop_reads,
            chat_calls("/v1/chat/completions", false),
        ),
    ];
    let mut results: Vec<Vec<Outcome>> = scenarios.iter().map(|_| Vec::new()).collect();
    // Envoy's CPU time (all its threads) per measured request: steadier than req/s on a
    // machine whose two cores the load generator, the upstream and the service share too.
    let mut cpu_us: Vec<Vec<f64>> = scenarios.iter().map(|_| Vec::new()).collect();
    for round in 0..s.rounds {
        for (i, (name, envoy, calls)) in scenarios.iter().enumerate() {
            let plan = |duration| Plan {
                addr: addr(envoy.port),
                connections: s.connections,
                duration: Some(duration),
                total: None,
                warmup: Duration::ZERO,
                calls: calls.clone(),
            };
            run(plan(s.warmup));
            let before = testkit::cpu_time(envoy.pid());
            let o = run(plan(s.proxy));
            let cpu = testkit::cpu_time(envoy.pid()).saturating_sub(before);
            let per_request = cpu.as_secs_f64() * 1e6 / o.requests.max(1) as f64;
            eprintln!(
                "round {}/{}: {name}: {:.0} req/s, Envoy CPU {per_request:.1} µs/request, p50 {:.2} ms, p99 {:.2} ms, errors {}, statuses {:?}",
                round + 1,
                s.rounds,
                o.rps(),
                o.p50_ms(),
                o.p99_ms(),
                o.errors,
                o.statuses
            );
            results[i].push(o);
            cpu_us[i].push(per_request);
        }
    }
    let cpu: Vec<f64> = cpu_us.iter().map(|c| median(c.iter().copied())).collect();
    let rps: Vec<f64> = results
        .iter()
        .map(|r| median(r.iter().map(Outcome::rps)))
        .collect();
    // SSE scenarios compare with Envoy alone on SSE, the rest with Envoy alone.
    let baseline_index = |i: usize| if i == 4 || i == 5 { 4 } else { 0 };
    let baseline = |i: usize| rps[baseline_index(i)];
    // No figure where the kernel keeps no per-thread CPU time.
    let cpu_cell = |c: f64, f: &dyn Fn(f64) -> String| {
        if c > 0.0 && cpu[0] > 0.0 {
            f(c)
        } else {
            "–".to_string()
        }
    };
    let mut proxy = Section::new(
        "Proxy overhead (Envoy --concurrency 1, mock LLM upstream)",
        &[
            "scenario",
            "req/s",
            "p50 ms",
            "p99 ms",
            "vs Envoy alone",
            "Envoy CPU µs/req",
            "CPU vs Envoy alone",
            "errors",
            "non-200",
        ],
    );
    for (i, (name, ..)) in scenarios.iter().enumerate() {
        let r = &results[i];
        let errors: u64 = r.iter().map(|o| o.errors).sum();
        let non_200: u64 = r
            .iter()
            .flat_map(|o| o.statuses.iter())
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum();
        proxy.push(Row::new(vec![
            name.to_string(),
            format!("{:.0}", rps[i]),
            format!("{:.2}", median(r.iter().map(Outcome::p50_ms))),
            format!("{:.2}", median(r.iter().map(Outcome::p99_ms))),
            format!("{:.2}×", rps[i] / baseline(i)),
            cpu_cell(cpu[i], &|c| format!("{c:.1}")),
            cpu_cell(cpu[i], &|c| format!("{:.2}×", c / cpu[baseline_index(i)])),
            errors.to_string(),
            non_200.to_string(),
        ]));
    }
    proxy.chart = scenarios
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| (name.to_string(), rps[i]))
        .collect();
    proxy.note(format!(
        "Targets (the project's): limited ≥ 0.40× Envoy alone: {:.2}× {}; not matched ≥ 0.95×: {:.2}× {}. Against the empty Wasm plugin (the floor of any Wasm filter): limited {:.2}×, not matched {:.2}×.",
        rps[2] / rps[0],
        verdict(rps[2] / rps[0] >= 0.40),
        rps[3] / rps[0],
        verdict(rps[3] / rps[0] >= 0.95),
        rps[2] / rps[1],
        rps[3] / rps[1]
    ));
    // Every request the leasing Envoy served, warm-ups included, against the checks that
    // reached its service (leases' asks included).
    let served = leasing.metric("leases.admitted") + leasing.metric("checks_allowed");
    let checks = lease_svc_checks(&lease_svc);
    // Every call the plugin made to its service: checks, lease asks and report batches.
    let calls = testkit::http::stats(leasing.admin, "cluster.ratelimit.upstream_rq_total")
        .get("cluster.ratelimit.upstream_rq_total")
        .copied()
        .unwrap_or(0);
    proxy.note(format!(
        "Quota leases on a hot key: {:.2}× Envoy alone (target ≥ 0.70×: {}); {checks} checks reached the service for {served} requests served ({:.1} %), {} of them admitted under a lease; {calls} calls in all (report batches included, {:.1} requests per call).",
        rps[6] / rps[0],
        verdict(rps[6] / rps[0] >= 0.70),
        100.0 * checks as f64 / served.max(1) as f64,
        leasing.metric("leases.admitted"),
        served as f64 / calls.max(1) as f64,
    ));
    if cpu[1] > 0.0 {
        proxy.note(format!(
            "A host call that hands bytes back (one request header read by the empty plugin, 10 per request): {:.1} µs of Envoy CPU each (the median difference over the empty plugin, divided by 10).",
            (cpu[7] - cpu[1]) / 10.0
        ));
    }

    let rss_loaded = (alone.rss_bytes(), plugin.rss_bytes());
    let vm = plugin.metric("vm_memory_bytes");
    let mut memory = Section::new("Memory", &["what", "value"]);
    memory.push(Row::new(vec![
        "plugin .wasm".into(),
        format!("{wasm_kib} KiB"),
    ]));
    memory.push(Row::new(vec![
        "Envoy alone, resident, idle → after load".into(),
        format!("{} → {}", mib(rss_idle.0), mib(rss_loaded.0)),
    ]));
    memory.push(Row::new(vec![
        "Envoy + plugin, resident, idle → after load".into(),
        format!("{} → {}", mib(rss_idle.1), mib(rss_loaded.1)),
    ]));
    memory.push(Row::new(vec![
        "plugin VM linear memory after load (vm_memory_bytes)".into(),
        mib(vm),
    ]));

    // A large stream through the plugin: the VM must not grow with it.
    let user = [("x-user", "stream-user")];
    let mut h: Vec<(&str, &str)> = user.to_vec();
    let size = s.stream_bytes.to_string();
    h.extend([
        ("x-mock-text-bytes", size.as_str()),
        ("x-mock-piece-bytes", "16384"),
    ]);
    let before = (plugin.metric("vm_memory_bytes"), plugin.rss_bytes());
    let started = Instant::now();
    let r = testkit::http::post_json(
        plugin.port,
        "/v1/chat/completions",
        &h,
        &json!({"stream": true}),
    );
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = (plugin.metric("vm_memory_bytes"), plugin.rss_bytes());
    memory.push(Row::new(vec![
        format!(
            "{} MB SSE response ({} MB/s): plugin VM memory before → after",
            s.stream_bytes / 1_000_000,
            (r.body.len() as f64 / 1e6 / took.as_secs_f64()).round()
        ),
        format!("{} → {}", mib(before.0), mib(after.0)),
    ]));
    memory.push(Row::new(vec![
        "… Envoy resident before → after".into(),
        format!("{} → {}", mib(before.1), mib(after.1)),
    ]));
    memory.note(format!(
        "Target (the project's): Envoy + plugin resident ≤ Envoy alone + 20 MB after the load: +{} {}.",
        mib(rss_loaded.1.saturating_sub(rss_loaded.0)),
        verdict(rss_loaded.1 <= rss_loaded.0 + 20 * 1024 * 1024)
    ));
    (proxy, memory)
}

fn service_section(s: &Settings) -> Section {
    let mut section = Section::new(
        "The rate-limit service alone",
        &[
            "store",
            "operation",
            "connections",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
        ],
    );
    let redis = RedisServer::start();
    // "memory, API key": every call carries the key the service requires (--api-key), so the
    // two memory rows tell what checking it costs.
    const KEY: &str = "bench-api-key-0123456789";
    let bearer = format!("Bearer {KEY}");
    // "redis, ledger": the spend ledger in a real PostgreSQL, beside the same Redis, so the two
    // Redis rows tell what keeping spend costs checks and reports.
    let postgres = testkit::postgres::PostgresServer::start();
    let ledger = postgres.url();
    for store in ["memory", "memory, API key", "redis", "redis, ledger"] {
        let url = redis.url();
        let args: Vec<&str> = match store {
            "redis" => vec!["--store", "redis", "--redis-url", url.as_str()],
            "redis, ledger" => vec![
                "--store",
                "redis",
                "--redis-url",
                url.as_str(),
                "--ledger",
                ledger.as_str(),
            ],
            "memory, API key" => vec!["--api-key", KEY],
            _ => vec![],
        };
        let headers: Vec<(&str, &str)> = if store.ends_with("API key") {
            vec![("authorization", bearer.as_str())]
        } else {
            vec![]
        };
        let svc = Service::start(&args, &[]);
        let checks: Vec<Call> = users(1000)
            .iter()
            .map(|u| {
                Call::post_json(
                    "/v1/check",
                    &headers,
                    &json!({"descriptors": [{"limit": "bench", "value": u, "rates": [{"tokens": 1_000_000_000_000u64, "window_s": 3600}]}], "reserve": 0}),
                )
            })
            .collect();
        let reports: Vec<Call> = (0..20_000)
            .map(|i| {
                Call::post_json(
                    "/v1/report",
                    &headers,
                    &json!({"reports": [{"id": format!("{:016x}-{}", i % 16, i / 16 + 1), "descriptors": [{"limit": "bench", "value": format!("user-{}", i % 1000), "rates": [{"tokens": 1_000_000_000_000u64, "window_s": 3600}]}], "tokens": 26, "reserved": 0,
                                        "spend": [{"model": format!("model-{}", i % 10), "requests": 1, "tokens": 26}]}]}),
                )
            })
            .collect();
        for (op, calls) in [("check", &checks), ("report", &reports)] {
            for connections in [1, 8, 32] {
                let o = run(Plan {
                    addr: addr(svc.port),
                    connections,
                    duration: Some(s.service),
                    total: None,
                    warmup: s.warmup / 2,
                    calls: calls.clone(),
                });
                eprintln!("service {store} {op} ×{connections}: {:.0} req/s", o.rps());
                section.push(Row::new(vec![
                    store.into(),
                    op.into(),
                    connections.to_string(),
                    format!("{:.0}", o.rps()),
                    format!("{:.2}", o.p50_ms()),
                    format!("{:.2}", o.p99_ms()),
                    o.errors.to_string(),
                ]));
            }
        }
    }
    section.note(
        "Reports carry unique ids (20,000 per store from 16 plugin VMs, then they repeat and count as duplicates), and what their request spent on one of 10 models (the spend ledger's input; a service without `--ledger` ignores it). \"redis, ledger\" keeps that spend in a real PostgreSQL: against \"redis\", what the ledger costs checks (nothing: it is off their path) and reports (a push onto an in-memory queue; the writes are batched in the background)."
            .into(),
    );
    section
}

fn accuracy_section() -> Section {
    let mut section = Section::new(
        "Accuracy under concurrency: budget 1,000 tokens, 50 concurrent requests of 100 tokens",
        &[
            "reserve",
            "admitted",
            "tokens admitted",
            "budget left at the service",
            "overshoot",
        ],
    );
    let llm = mock_llm();
    for (label, reserve) in [("0", json!(0)), ("\"max_tokens\"", json!("max_tokens"))] {
        let svc = Service::start(&[], &[]);
        let config = json!({
            "service": {"cluster": "ratelimit", "timeout_ms": 2000},
            "limits": [{"name": "budget", "key": "", "tokens": 1000, "window": "1h"}],
            "reserve": {"tokens": reserve}
        });
        let envoy = Envoy::start(
            &config,
            &[
                cluster("ratelimit", svc.port),
                cluster("upstream", llm.port),
            ],
        );
        section.push(fifty_requests(&envoy, &svc, label, "300"));
    }
    section.push(after_a_window_boundary(&llm));
    section.push(leased_requests(&llm));
    section.note("Quota leases: 1,500 requests of 100 tokens from 50 connections over two Envoy workers against a 100,000-token budget. A lease is a reservation taken from the budget, and each request holds its own reservation out of it, so the stated overshoot bound is the same as without leases: 0 when usage stays within the reserved cap.".into());
    section.note("Without a reservation every request that finds budget left is admitted before any usage is known; with `reserve: max_tokens` the budget is taken at admission.".into());
    section.note("After a window boundary: a request reserves the whole budget 2.8 s into a 4-second window and is answered (10 tokens) in the next one; 2.9 s into that window the 50 requests arrive. Its refund goes back to the window that held the reservation, so the new window admits no more than its budget.".into());
    section
}

/// Serving within the budget: trimmed grants under concurrency and streams the plugin ends,
/// each on a 1,000-token budget; what they were charged in all is read from a second limit the
/// same requests never reach.
fn within_budget_section() -> Section {
    let mut section = Section::new(
        "Serving within the budget: budget 1,000 tokens",
        &["case", "admitted", "charged", "overshoot"],
    );
    let llm = mock_llm();
    let trim = json!({"reserve": {"tokens": "max_tokens", "trim": true, "min": 20}});
    let runaway = [
        ("x-mock-ignore-cap", "1"),
        ("x-mock-prompt-tokens", "0"),
        ("x-mock-completion-tokens", "5000"),
        ("x-mock-piece-bytes", "40"),
    ];
    let asks = [
        ("x-mock-prompt-tokens", "0"),
        ("x-mock-completion-tokens", "100"),
        ("x-mock-latency-ms", "300"),
    ];
    let stream = json!({"model": "bench", "stream": true, "max_tokens": 4000});
    // (what, plugin options, request headers, body, concurrent requests)
    type Case<'a> = (&'a str, Value, &'a [(&'a str, &'a str)], Value, usize);
    let cases: [Case; 3] = [
        (
            "`reserve.trim`: 50 concurrent requests asking 100 output tokens",
            trim.clone(),
            &asks,
            json!({"model": "bench", "max_tokens": 100}),
            50,
        ),
        (
            "`stream_cutoff`: 1 stream running 5,000 tokens past its cap",
            json!({"stream_cutoff": true}),
            &runaway,
            stream.clone(),
            1,
        ),
        (
            "`reserve.trim`, upstream ignoring caps: 10 concurrent streams of 5,000 tokens",
            trim,
            &runaway,
            stream,
            10,
        ),
    ];
    for (label, extra, headers, body, n) in cases {
        let svc = Service::start(&[], &[]);
        let mut config = json!({
            "service": {"cluster": "ratelimit", "timeout_ms": 2000},
            "limits": [
                {"name": "budget", "key": "", "tokens": 1000, "window": "1h"},
                {"name": "meter", "key": "", "tokens": 1_000_000_000u64, "window": "1h"}
            ]
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let envoy = Envoy::start(
            &config,
            &[
                cluster("ratelimit", svc.port),
                cluster("upstream", llm.port),
            ],
        );
        let o = run(Plan {
            addr: addr(envoy.port),
            connections: n,
            duration: None,
            total: Some(n as u64),
            warmup: Duration::ZERO,
            calls: vec![Call::post_json("/v1/chat/completions", headers, &body)],
        });
        settled(&envoy);
        let charged = 1_000_000_000 - svc.remaining("meter", "").unwrap_or(1_000_000_000);
        section.push(Row::new(vec![
            label.into(),
            format!("{} of {n}", o.statuses.get(&200).copied().unwrap_or(0)),
            charged.to_string(),
            charged.saturating_sub(1000).to_string(),
        ]));
    }
    section.note("Trimmed requests are granted what is left (at least 20 output tokens), atomically: together they are never charged past the budget. A stream whose charge passes what its budget had for it is ended in its provider's shape at the next event boundary: it is charged what it delivered: at most the event that passed the budget (10 tokens here).".into());
    section
}

/// The boundary row of the accuracy table (see its note).
fn after_a_window_boundary(llm: &Service) -> Row {
    const WINDOW_MS: u64 = 4000;
    let svc = Service::start(&[], &[]);
    let config = json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 2000},
        "limits": [{"name": "budget", "key": "", "tokens": 1000, "window": WINDOW_MS / 1000}],
        "reserve": {"tokens": "max_tokens"}
    });
    let envoy = Envoy::start(
        &config,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
    );
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let phase = now() % WINDOW_MS;
    std::thread::sleep(Duration::from_millis(
        (WINDOW_MS + 2800 - phase) % WINDOW_MS,
    ));
    let late = Call::post_json(
        "/v1/chat/completions",
        &[
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "10"),
            ("x-mock-latency-ms", "1500"),
        ],
        &json!({"model": "bench", "max_tokens": 1000}),
    );
    run(Plan {
        addr: addr(envoy.port),
        connections: 1,
        duration: None,
        total: Some(1),
        warmup: Duration::ZERO,
        calls: vec![late],
    });
    std::thread::sleep(Duration::from_millis(
        (WINDOW_MS + 2900 - now() % WINDOW_MS) % WINDOW_MS,
    ));
    fifty_requests(&envoy, &svc, "\"max_tokens\", after a window boundary", "0")
}

/// 50 concurrent requests of 100 tokens (answered after `latency_ms`) on the 1,000-token
/// budget: the row of the accuracy table, once every report has landed.
fn fifty_requests(envoy: &Envoy, svc: &Service, label: &str, latency_ms: &str) -> Row {
    let call = Call::post_json(
        "/v1/chat/completions",
        &[
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "100"),
            ("x-mock-latency-ms", latency_ms),
        ],
        &json!({"model": "bench", "max_tokens": 100}),
    );
    let o = run(Plan {
        addr: addr(envoy.port),
        connections: 50,
        duration: None,
        total: Some(50),
        warmup: Duration::ZERO,
        calls: vec![call],
    });
    let admitted = o.statuses.get(&200).copied().unwrap_or(0);
    settled(envoy);
    let remaining = svc.remaining("budget", "").unwrap_or(0);
    Row::new(vec![
        label.into(),
        format!("{admitted} of 50"),
        (admitted * 100).to_string(),
        remaining.to_string(),
        format!("{}", (admitted * 100).saturating_sub(1000)),
    ])
}

/// The checks a service answered (allowed or denied), from its `/metrics`.
fn lease_svc_checks(svc: &Service) -> u64 {
    let text = testkit::http::send(svc.port, "GET", "/metrics", &[], b"").text();
    [
        "ratelimit_checks_total{outcome=\"allowed\"}",
        "ratelimit_checks_total{outcome=\"denied\"}",
    ]
    .iter()
    .filter_map(|series| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
    })
    .sum()
}

/// Quota leases over two Envoy workers (two plugin VMs): 50 connections send requests of 100
/// tokens at a 100,000-token budget until well past it. The stated bound: leases add no
/// overshoot (every request holds its reservation out of a lease taken from the budget).
fn leased_requests(llm: &Service) -> Row {
    let svc = Service::start(&[], &[]);
    let config = json!({
        "service": {"cluster": "ratelimit", "timeout_ms": 2000, "admission": "lease"},
        "limits": [{"name": "budget", "key": "", "tokens": 100_000, "window": "1h"}],
        "reserve": {"tokens": "max_tokens"}
    });
    let envoy = Envoy::start_with_workers(
        &config,
        &[
            cluster("ratelimit", svc.port),
            cluster("upstream", llm.port),
        ],
        2,
    );
    let call = Call::post_json(
        "/v1/chat/completions",
        &[
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "100"),
            ("x-mock-latency-ms", "20"),
        ],
        &json!({"model": "bench", "max_tokens": 100}),
    );
    let o = run(Plan {
        addr: addr(envoy.port),
        connections: 50,
        duration: None,
        total: Some(1_500),
        warmup: Duration::ZERO,
        calls: vec![call],
    });
    let admitted = o.statuses.get(&200).copied().unwrap_or(0);
    // Leases end within their time (2 s) and give back what they did not use.
    std::thread::sleep(Duration::from_millis(3_500));
    settled(&envoy);
    let remaining = svc.remaining("budget", "").unwrap_or(0);
    Row::new(vec![
        format!(
            "\"max_tokens\", leases, 2 workers, budget 100,000 ({} under leases)",
            envoy.metric("leases.admitted")
        ),
        format!("{admitted} of 1,500"),
        (admitted * 100).to_string(),
        remaining.to_string(),
        format!("{} (bound: 0)", (admitted * 100).saturating_sub(100_000)),
    ])
}

/// Waits (at most 10 s) until the plugin's report queue is empty.
fn settled(envoy: &Envoy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::sleep(Duration::from_millis(200));
    while envoy.metric("report_queue") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "(met)"
    } else {
        "(missed)"
    }
}

fn main() {
    let cli = Cli::parse();
    if cli.soak {
        let (section, ok) = soak::section(&soak::Soak {
            requests: cli.requests,
            users: cli.users,
            max_counters: cli.max_counters,
            connections: cli.connections,
        });
        let markdown = report::markdown(&[section], false);
        println!("{markdown}");
        std::process::exit(if ok { 0 } else { 1 });
    }
    let s = if cli.smoke {
        Settings {
            rounds: 1,
            proxy: Duration::from_millis(300),
            service: Duration::from_millis(150),
            warmup: Duration::from_millis(100),
            connections: 4,
            stream_bytes: 1_000_000,
        }
    } else {
        Settings {
            rounds: cli.rounds.max(1),
            proxy: Duration::from_secs_f64(cli.seconds),
            service: Duration::from_secs_f64((cli.seconds / 2.0).max(0.5)),
            warmup: Duration::from_secs(1),
            connections: cli.connections,
            stream_bytes: 100_000_000,
        }
    };
    if cli.service_only {
        let sections = vec![service_section(&s)];
        let markdown = report::markdown(&sections, cli.smoke);
        println!("{markdown}");
        return;
    }
    let wasm_kib = std::fs::metadata(plugin_wasm()).map_or(0, |m| m.len() / 1024);
    let (proxy, memory) = proxy_section(&s, wasm_kib);
    let mut sections = vec![proxy, memory];
    if !cli.proxy_only {
        sections.push(service_section(&s));
        sections.push(accuracy_section());
        sections.push(within_budget_section());
        let (sustained, _) = soak::section(&soak::Soak {
            requests: if cli.smoke { 2_000 } else { 300_000 },
            users: 100,
            max_counters: 1_000,
            connections: s.connections,
        });
        sections.push(sustained);
    }
    let markdown = report::markdown(&sections, cli.smoke);
    println!("{markdown}");
    if let Err(e) = report::write(&cli.out, &markdown, &sections[0]) {
        eprintln!("bench: could not write {}: {e}", cli.out.display());
        std::process::exit(1);
    }
    eprintln!("wrote {0}/results.md and {0}/chart.svg", cli.out.display());
}
