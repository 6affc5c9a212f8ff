//! One behavioural suite, run against the memory store, a real `redis-server`, and a real
//! three-node Redis Cluster: admission, reservations, reports and their ids, window and bucket
//! arithmetic on a manual clock, concurrency, the ASM endpoints, and Redis outages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use ratelimit_service::api::*;
use ratelimit_service::clock::Clock;
use ratelimit_service::limiter::{Failure, Limiter};
use ratelimit_service::rules::Rules;
use ratelimit_service::store::redis::RedisTarget;
use ratelimit_service::store::{MemoryStore, RedisStore, Store};
use serde_json::json;
use testkit::redis::{RedisCluster, RedisServer};

/// A start time aligned to every window (a whole number of days).
const T0: i64 = 20_000 * 86_400_000;

const RULES: &str = r#"[
  {"rate_limit_key_regex": "regular-user.*", "redis_expired_seconds": 300, "fill_interval_second": 30, "tokens_per_fill": 50, "max_tokens": 200},
  {"rate_limit_key_regex": "subscriber.*", "redis_expired_seconds": 600, "fill_interval_second": 60, "tokens_per_fill": 100, "max_tokens": 1000},
  {"rate_limit_key_regex": "^bucket-", "fill_interval_second": 1, "tokens_per_fill": 10, "max_tokens": 100}
]"#;

struct Ctx {
    limiter: Arc<Limiter>,
    clock: Clock,
    /// Prefix for every limit name and key, so scenarios can share one Redis Cluster.
    ns: String,
    /// The Redis URLs of a Redis store (to open the same store with other settings).
    urls: Option<Vec<String>>,
    /// Report ids by the names the scenarios give them.
    report_names: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Ctx {
    fn new(store: Store, sliding: bool, ns: &str) -> Ctx {
        let clock = Clock::manual(T0);
        let limiter = Arc::new(Limiter::new(
            store,
            Rules::parse(RULES).unwrap(),
            clock.clone(),
            sliding,
        ));
        Ctx {
            limiter,
            clock,
            ns: ns.to_string(),
            urls: None,
            report_names: Default::default(),
        }
    }

    fn memory() -> Ctx {
        Ctx::new(Store::Memory(MemoryStore::new(100_000)), true, "")
    }

    fn redis(urls: &[String], ns: &str) -> Ctx {
        Ctx::redis_with(urls, ns, true)
    }

    fn redis_with(urls: &[String], ns: &str, sliding: bool) -> Ctx {
        let target = RedisTarget::parse(urls).unwrap();
        Ctx {
            urls: Some(urls.to_vec()),
            ..Ctx::new(
                Store::Redis(Arc::new(RedisStore::new(
                    target,
                    Duration::from_millis(1000),
                ))),
                sliding,
                ns,
            )
        }
    }

    /// The same kind of store, fresh (memory) or in a key space of its own (Redis), counting
    /// plugin-owned rates in fixed windows.
    fn with_fixed_windows(&self) -> Ctx {
        match &self.urls {
            None => Ctx::new(Store::Memory(MemoryStore::new(100_000)), false, &self.ns),
            Some(urls) => Ctx::redis_with(urls, &format!("{}fixed/", self.ns), false),
        }
    }

    /// A check id of this scenario's plugin VM (its source derives from the key space, so
    /// scenarios sharing a cluster do not share reservation rings).
    fn id(&self, seq: u64) -> String {
        let source = self.ns.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        SeqId { source, seq }.format()
    }

    async fn check_as(&self, ds: &[Descriptor], reserve: u64, id: &str) -> CheckResponse {
        let req = CheckRequest {
            descriptors: ds.to_vec(),
            reserve: Amount::tokens(reserve),
            id: Some(id.to_string()),
            trim: None,
            lease: None,
        };
        match self.limiter.check(&req).await {
            Ok(r) => r,
            Err(_) => panic!("check failed"),
        }
    }

    async fn settle(&self, report: Report) -> ReportResponse {
        let req = ReportRequest {
            reports: vec![report],
        };
        match self.limiter.report(&req).await {
            Ok(r) => r,
            Err(_) => panic!("report failed"),
        }
    }

    fn d(&self, limit: &str, value: &str, rates: &[(u64, u64)]) -> Descriptor {
        Descriptor {
            limit: format!("{}{limit}", self.ns),
            value: value.to_string(),
            rates: rates
                .iter()
                .map(|&(budget, window_s)| Rate {
                    budget,
                    window_s,
                    calendar: None,
                })
                .collect(),
            shared: false,
            ..Default::default()
        }
    }

    async fn check(&self, ds: &[Descriptor], reserve: u64) -> CheckResponse {
        let req = CheckRequest {
            descriptors: ds.to_vec(),
            reserve: Amount::tokens(reserve),
            id: None,
            trim: None,
            lease: None,
        };
        match self.limiter.check(&req).await {
            Ok(r) => r,
            Err(Failure::Bad(b)) => panic!("bad request: {b:?}"),
            Err(Failure::Store(e)) => panic!("store: {e}"),
        }
    }

    async fn report(
        &self,
        id: &str,
        ds: &[Descriptor],
        tokens: u64,
        reserved: u64,
    ) -> ReportResponse {
        let req = ReportRequest {
            reports: vec![Report {
                spend: Vec::new(),
                id: self.report_id(id),
                descriptors: ds.to_vec(),
                used: Amount::tokens(tokens),
                reserved: Amount::tokens(reserved),
                usage: None,
                reserved_at_ms: None,
                release: None,
            }],
        };
        match self.limiter.report(&req).await {
            Ok(r) => r,
            Err(_) => panic!("report failed"),
        }
    }

    /// The report id a test calls `name`: the same name, the same id.
    fn report_id(&self, name: &str) -> String {
        let mut names = self.report_names.lock().unwrap();
        let next = 1_000_000 + names.len() as u64;
        let seq = *names.entry(name.to_string()).or_insert(next);
        self.id(seq)
    }

    async fn remaining(&self, d: &Descriptor) -> Vec<u64> {
        self.check(std::slice::from_ref(d), 0)
            .await
            .limits
            .iter()
            .map(|l| l.remaining)
            .collect()
    }

    fn advance(&self, ms: i64) {
        self.clock.advance(ms);
    }
}

async fn admits_down_to_the_last_token(ctx: &Ctx) {
    let d = ctx.d("key", "alice", &[(10, 60)]);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(r.allowed);
    assert_eq!(
        r.limits,
        vec![LimitStatus {
            limit: d.limit.clone(),
            value: "alice".into(),
            budget: 10,
            window_s: 60,
            remaining: 10,
            reset_ms: 0,
            ..Default::default()
        }]
    );
    assert_eq!(
        ctx.report("r1", std::slice::from_ref(&d), 9, 0).await,
        (ReportResponse {
            accepted: 1,
            duplicates: 0,
            results: vec![ReportResult::of(Outcome::Applied)],
        })
    );
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(r.allowed, "1 token left admits one more request");
    assert_eq!(r.limits[0].remaining, 1);
    ctx.report("r2", std::slice::from_ref(&d), 1, 0).await;
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(!r.allowed, "exactly at the threshold nothing is admitted");
    assert_eq!(r.denied_by.as_deref(), Some(d.limit.as_str()));
    assert!(r.retry_after_ms > 0);
    assert_eq!(r.limits[0].remaining, 0);
}

async fn reserve_needs_room_and_is_taken_from_every_descriptor(ctx: &Ctx) {
    let a = ctx.d("a", "x", &[(100, 60)]);
    let b = ctx.d("b", "y", &[(20, 60), (1000, 3600)]);
    let r = ctx.check(&[a.clone(), b.clone()], 15).await;
    assert!(r.allowed);
    let rem: Vec<u64> = r.limits.iter().map(|l| l.remaining).collect();
    assert_eq!(rem, vec![85, 5, 985]);
    // 5 left on b's first rate: a reserve of 6 is refused and nothing is taken.
    let r = ctx.check(&[a.clone(), b.clone()], 6).await;
    assert!(!r.allowed);
    assert_eq!(r.denied_by.as_deref(), Some(b.limit.as_str()));
    assert_eq!(ctx.remaining(&a).await, vec![85]);
    assert_eq!(ctx.remaining(&b).await, vec![5, 985]);
    // The report settles the reservation: 15 reserved, 3 used → 12 back.
    ctx.report("settle", &[a.clone(), b.clone()], 3, 15).await;
    assert_eq!(ctx.remaining(&a).await, vec![97]);
    assert_eq!(ctx.remaining(&b).await, vec![17, 997]);
}

async fn reserve_larger_than_the_budget_needs_a_full_budget(ctx: &Ctx) {
    let d = ctx.d("small", "x", &[(100, 60)]);
    let r = ctx.check(std::slice::from_ref(&d), 4096).await;
    assert!(
        r.allowed,
        "a full budget admits a request whose max_tokens exceeds it"
    );
    assert_eq!(r.limits[0].remaining, 0);
    assert!(!ctx.check(std::slice::from_ref(&d), 4096).await.allowed);
}

async fn retried_reports_are_charged_once(ctx: &Ctx) {
    let d = ctx.d("dedup", "x", &[(1000, 3600)]);
    assert_eq!(
        ctx.report("same-id", std::slice::from_ref(&d), 100, 0)
            .await,
        (ReportResponse {
            accepted: 1,
            duplicates: 0,
            results: vec![ReportResult::of(Outcome::Applied)],
        })
    );
    assert_eq!(
        ctx.report("same-id", std::slice::from_ref(&d), 100, 0)
            .await,
        (ReportResponse {
            accepted: 0,
            duplicates: 1,
            results: vec![ReportResult::of(Outcome::Duplicate)],
        })
    );
    assert_eq!(ctx.remaining(&d).await, vec![900]);
    ctx.advance(10 * 60_000);
    assert_eq!(
        ctx.report("same-id", std::slice::from_ref(&d), 100, 0)
            .await
            .duplicates,
        1,
        "ids are kept at least 10 minutes"
    );
    assert_eq!(ctx.remaining(&d).await, vec![900]);
    // A batch: one new, one retried.
    let req = ReportRequest {
        reports: vec![
            Report {
                spend: Vec::new(),
                id: ctx.report_id("same-id"),
                descriptors: vec![d.clone()],
                used: Amount::tokens(100),
                reserved: Amount::tokens(0),
                usage: None,
                reserved_at_ms: None,
                release: None,
            },
            Report {
                spend: Vec::new(),
                id: ctx.report_id("other"),
                descriptors: vec![d.clone()],
                used: Amount::tokens(50),
                reserved: Amount::tokens(0),
                usage: None,
                reserved_at_ms: None,
                release: None,
            },
        ],
    };
    let r = ctx.limiter.report(&req).await.ok().unwrap();
    assert_eq!((r.accepted, r.duplicates), (1, 1));
    let outcomes: Vec<Outcome> = r.results.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [Outcome::Duplicate, Outcome::Applied]);
    assert_eq!(ctx.remaining(&d).await, vec![850]);
}

async fn sliding_window_arithmetic(ctx: &Ctx) {
    let d = ctx.d("slide", "x", &[(100, 60)]);
    ctx.report("s1", std::slice::from_ref(&d), 80, 0).await;
    ctx.advance(30_000);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert_eq!((r.limits[0].remaining, r.limits[0].reset_ms), (20, 90_000));
    ctx.advance(60_000); // 90 s: half of the previous window still counts
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert_eq!((r.limits[0].remaining, r.limits[0].reset_ms), (60, 30_000));
    ctx.report("s2", std::slice::from_ref(&d), 60, 0).await;
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(!r.allowed);
    // 60 now + 40 of the previous window's 80: one token fits once that weight is 39,
    // 30.75 s into the window: 750 ms from now.
    assert_eq!(r.retry_after_ms, 750);
    ctx.advance(750 - 1);
    assert!(!ctx.check(std::slice::from_ref(&d), 0).await.allowed);
    ctx.advance(1);
    assert!(ctx.check(std::slice::from_ref(&d), 0).await.allowed);
    ctx.advance(240_000);
    assert_eq!(ctx.remaining(&d).await, vec![100]);
}

async fn debt_and_refunds(ctx: &Ctx) {
    let d = ctx.d("debt", "x", &[(100, 60)]);
    ctx.report("big", std::slice::from_ref(&d), 450, 0).await;
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(!r.allowed);
    assert_eq!(r.limits[0].remaining, 0, "a counter in debt reports 0");
    ctx.report("refund", std::slice::from_ref(&d), 0, 400).await;
    assert_eq!(ctx.remaining(&d).await, vec![50]);
}

async fn service_owned_buckets(ctx: &Ctx) {
    let d = ctx.d("svc", "bucket-a", &[]);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert_eq!(r.limits[0].remaining, 100, "buckets start full");
    assert_eq!((r.limits[0].budget, r.limits[0].window_s), (100, 1));
    ctx.report("b1", std::slice::from_ref(&d), 150, 0).await;
    ctx.advance(500);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(!r.allowed);
    assert_eq!(
        r.retry_after_ms, 5_500,
        "-50 needs 6 fills from the last refill"
    );
    ctx.advance(2_000); // 2.5 s after the charge: 2 fills, half an interval kept
    assert_eq!(ctx.remaining(&d).await, vec![0]);
    ctx.advance(3_500); // 6 s: 6 fills → 10
    assert_eq!(ctx.remaining(&d).await, vec![10]);
    ctx.advance(3_600_000);
    assert_eq!(ctx.remaining(&d).await, vec![100], "never above max_tokens");
    // No rule: not limited, no figures.
    let free = ctx.d("svc", "anonymous", &[]);
    let r = ctx.check(&[free], 1_000_000).await;
    assert!(r.allowed && r.limits.is_empty());
}

async fn counters_never_collide(ctx: &Ctx) {
    let a = ctx.d("a:b", "c", &[(10, 60)]);
    let b = ctx.d("a", "b:c", &[(10, 60)]);
    let mut shared = ctx.d("a", "b:c", &[(10, 60)]);
    shared.shared = true;
    ctx.report("c1", std::slice::from_ref(&a), 3, 0).await;
    ctx.report("c2", std::slice::from_ref(&b), 5, 0).await;
    ctx.report("c3", std::slice::from_ref(&shared), 7, 0).await;
    assert_eq!(ctx.remaining(&a).await, vec![7]);
    assert_eq!(ctx.remaining(&b).await, vec![5]);
    assert_eq!(ctx.remaining(&shared).await, vec![3]);
    let q = ctx
        .limiter
        .quota(&shared.limit, "b:c", true)
        .await
        .ok()
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].budget, q[0].remaining), (10, 3));
    assert!(ctx
        .limiter
        .quota(&shared.limit, "nobody", false)
        .await
        .ok()
        .unwrap()
        .is_empty());
}

async fn concurrent_reports_balance_exactly(ctx: &Ctx) {
    let d = ctx.d("conc", "x", &[(1_000_000, 3600)]);
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (limiter, d, id) = (
            ctx.limiter.clone(),
            d.clone(),
            ctx.report_id(&format!("c{i}")),
        );
        tasks.push(tokio::spawn(async move {
            let req = ReportRequest {
                reports: vec![Report {
                    spend: Vec::new(),
                    id,
                    descriptors: vec![d],
                    used: Amount::tokens(i + 1),
                    reserved: Amount::tokens(0),
                    usage: None,
                    reserved_at_ms: None,
                    release: None,
                }],
            };
            assert!(limiter.report(&req).await.is_ok());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        ctx.remaining(&d).await,
        vec![1_000_000 - (1..=200).sum::<u64>()]
    );
}

async fn concurrent_reservations_never_overshoot(ctx: &Ctx) {
    let d = ctx.d("overshoot", "x", &[(1000, 60)]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (limiter, d) = (ctx.limiter.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            let r = limiter
                .check(&CheckRequest {
                    descriptors: vec![d],
                    reserve: Amount::tokens(100),
                    id: None,
                    trim: None,
                    lease: None,
                })
                .await;
            matches!(r, Ok(r) if r.allowed)
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap() as u32;
    }
    assert_eq!(
        admitted, 10,
        "1000 tokens admit exactly ten reservations of 100"
    );
}

async fn asm_endpoints(ctx: &Ctx) {
    let regular = format!("{}regular-user", ctx.ns);
    let ok = ctx
        .limiter
        .asm_check(std::slice::from_ref(&regular))
        .await
        .ok()
        .unwrap();
    assert_eq!(
        ok,
        AsmCheckResponse {
            allow: true,
            description: String::new()
        }
    );
    let update = AsmUpdate {
        ratelimit_keys: vec![regular.clone()],
        prompt_tokens: 100,
        completion_tokens: 150,
        total_tokens: 250,
    };
    // ASM's documented bucket: 200, 50 more every 30 s; 250 spent leaves it 50 in debt.
    assert!(ctx.limiter.asm_update(&update).await.is_ok());
    let denied = ctx
        .limiter
        .asm_check(std::slice::from_ref(&regular))
        .await
        .ok()
        .unwrap();
    assert_eq!(
        denied,
        AsmCheckResponse {
            allow: false,
            description: format!("{regular} is being rate-limited")
        }
    );
    let subscriber = format!("{}subscriber", ctx.ns);
    assert!(
        ctx.limiter
            .asm_check(&[subscriber])
            .await
            .ok()
            .unwrap()
            .allow
    );
    // One fill (30 s, +50) pays the debt; the next one serves the regular user again.
    ctx.advance(30_000);
    assert!(
        !ctx.limiter
            .asm_check(std::slice::from_ref(&regular))
            .await
            .ok()
            .unwrap()
            .allow
    );
    ctx.advance(30_000);
    assert!(ctx.limiter.asm_check(&[regular]).await.ok().unwrap().allow);
    // Keys no rule names are not limited.
    assert!(
        ctx.limiter
            .asm_check(&["anonymous".into()])
            .await
            .ok()
            .unwrap()
            .allow
    );
}

async fn bad_requests_are_refused(ctx: &Ctx) {
    let mut d = ctx.d("bad", "x", &[(0, 60)]);
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![d.clone()],
            reserve: Amount::tokens(0),
            id: None,
            trim: None,
            lease: None,
        })
        .await;
    assert!(
        matches!(r, Err(Failure::Bad(BadRequest(m))) if m.contains("descriptors[0].rates[0].tokens"))
    );
    d.rates[0] = Rate {
        budget: 1,
        window_s: 0,
        calendar: None,
    };
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![d.clone()],
            reserve: Amount::tokens(0),
            id: None,
            trim: None,
            lease: None,
        })
        .await;
    assert!(matches!(r, Err(Failure::Bad(BadRequest(m))) if m.contains("window_s")));
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![ctx.d("x", "y", &[]); 65],
            reserve: Amount::tokens(0),
            id: None,
            trim: None,
            lease: None,
        })
        .await;
    assert!(matches!(r, Err(Failure::Bad(_))));
    let req = ReportRequest {
        reports: vec![Report {
            spend: Vec::new(),
            id: String::new(),
            descriptors: vec![],
            used: Amount::tokens(1),
            reserved: Amount::tokens(0),
            usage: None,
            reserved_at_ms: None,
            release: None,
        }],
    };
    // A bad report is refused on its own; the rest of its batch is applied.
    let mut req = req;
    req.reports.push(Report {
        spend: Vec::new(),
        id: ctx.report_id("good-after-bad"),
        descriptors: vec![ctx.d("bad", "z", &[(10, 60)])],
        ..req.reports[0].clone()
    });
    req.reports.push(Report {
        spend: Vec::new(),
        id: "not-an-id".into(),
        ..req.reports[1].clone()
    });
    let r = ctx.limiter.report(&req).await.ok().unwrap();
    let outcomes: Vec<Outcome> = r.results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Rejected, Outcome::Applied, Outcome::Rejected]
    );
    assert!(r.results[0]
        .error
        .as_deref()
        .unwrap()
        .contains("reports[0].id"));
    assert!(r.results[2]
        .error
        .as_deref()
        .unwrap()
        .contains("reports[2].id"));
    let too_many = ReportRequest {
        reports: vec![req.reports[1].clone(); MAX_REPORTS + 1],
    };
    assert!(
        matches!(ctx.limiter.report(&too_many).await, Err(Failure::Bad(BadRequest(m))) if m.contains("reports: more than"))
    );
}

/// A descriptor counting in calendar periods (`period` in `zone`), optionally in money.
fn calendar(d: &Descriptor, period: Period, zone: &str, currency: Option<&str>) -> Descriptor {
    let mut d = d.clone();
    for r in &mut d.rates {
        r.window_s = period.longest_s();
        r.calendar = Some(Calendar {
            period,
            timezone: zone.into(),
        });
    }
    d.currency = currency.map(str::to_string);
    d
}

async fn calendar_months_reset_at_their_start_in_their_zone(ctx: &Ctx) {
    // T0 is 2024-10-04T00:00Z; October ends in Shanghai at 2024-10-31T16:00Z.
    let d = calendar(
        &ctx.d("monthly", "team-a", &[(100, 0)]),
        Period::Month,
        "Asia/Shanghai",
        None,
    );
    ctx.report("m1", std::slice::from_ref(&d), 100, 0).await;
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(!r.allowed);
    let end = T0 + 27 * 86_400_000 + 16 * 3_600_000;
    assert_eq!(
        r.limits[0].resets_at.as_deref(),
        Some("2024-11-01T00:00:00+08:00")
    );
    assert_eq!(r.limits[0].period, Some(Period::Month));
    assert_eq!(r.retry_after_ms as i64, end - T0);
    ctx.advance(end - T0 - 1);
    assert!(!ctx.check(std::slice::from_ref(&d), 0).await.allowed);
    ctx.advance(1);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert!(r.allowed);
    assert_eq!(r.limits[0].remaining, 100);
    assert_eq!(
        r.limits[0].resets_at.as_deref(),
        Some("2024-12-01T00:00:00+08:00")
    );
    // A refund of a reservation taken in October does not enlarge November.
    ctx.report("m2", std::slice::from_ref(&d), 30, 0).await;
    let late = Report {
        spend: Vec::new(),
        id: ctx.report_id("m3"),
        descriptors: vec![d.clone()],
        used: Amount::tokens(0),
        reserved: Amount::tokens(50),
        reserved_at_ms: Some((end - 1) as u64),
        ..Default::default()
    };
    ctx.settle(late.clone()).await;
    assert_eq!(ctx.remaining(&d).await, [70]);
    // Unknown zones are refused by name.
    let unknown = calendar(&d, Period::Day, "Mars/Olympus", None);
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![unknown],
            ..Default::default()
        })
        .await;
    assert!(
        matches!(r, Err(Failure::Bad(BadRequest(m))) if m.contains("unknown time zone \"Mars/Olympus\""))
    );
}

async fn money_and_tokens_are_counted_apart(ctx: &Ctx) {
    let tokens = ctx.d("tokens", "alice", &[(1_000, 60)]);
    // 20.00 USD a day, in micro units.
    let money = calendar(
        &ctx.d("spend", "alice", &[(20_000_000, 0)]),
        Period::Day,
        "UTC",
        Some("USD"),
    );
    let both = [tokens.clone(), money.clone()];
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: both.to_vec(),
            reserve: Amount::new(100, 5_000_000),
            ..Default::default()
        })
        .await
        .ok()
        .unwrap();
    assert!(r.allowed);
    assert_eq!(
        r.limits
            .iter()
            .map(|l| (l.remaining, l.currency.clone()))
            .collect::<Vec<_>>(),
        [(900, None), (15_000_000, Some("USD".to_string()))]
    );
    // Used 40 tokens costing 1.234567 USD: each unit gets its own refund.
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("spend-1"),
        descriptors: both.to_vec(),
        used: Amount::new(40, 1_234_567),
        reserved: Amount::new(100, 5_000_000),
        reserved_at_ms: r.reserved_at_ms,
        ..Default::default()
    })
    .await;
    let left = ctx.check(&both, 0).await;
    assert_eq!(
        left.limits.iter().map(|l| l.remaining).collect::<Vec<_>>(),
        [960, 20_000_000 - 1_234_567]
    );
    // A reserve in money larger than what is left is refused, whatever the tokens say.
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: both.to_vec(),
            reserve: Amount::new(1, 19_000_000),
            ..Default::default()
        })
        .await
        .ok()
        .unwrap();
    assert!(!r.allowed);
    assert_eq!(r.denied_by.as_deref(), Some(money.limit.as_str()));
    // An operator's lookup names the currency.
    let q = ctx
        .limiter
        .quota(&money.limit, "alice", false)
        .await
        .ok()
        .unwrap();
    assert_eq!(q[0].currency.as_deref(), Some("USD"));
    assert_eq!(q[0].remaining, 20_000_000 - 1_234_567);
}

/// `"mode": "shadow"`: a shadow limit is checked and charged exactly, never denies nor trims,
/// and is named in `shadow_denied` (not in `limits`) when it would have denied.
async fn shadow_limits_count_and_never_deny(ctx: &Ctx) {
    let enforced = ctx.d("sh-enforced", "alice", &[(1000, 60)]);
    let shadow = Descriptor {
        shadow: true,
        ..ctx.d("sh-shadow", "alice", &[(100, 60)])
    };
    let plain = Descriptor {
        shadow: false,
        ..shadow.clone()
    };
    let both = vec![enforced.clone(), shadow.clone()];
    let r = ctx.check(&both, 60).await;
    assert!(r.allowed && r.shadow_denied.is_empty(), "{r:?}");
    let r = ctx.check(&both, 60).await;
    assert!(r.allowed, "{r:?}");
    assert_eq!(r.shadow_denied, vec![shadow.limit.clone()]);
    assert!(r.limits.iter().all(|l| l.limit == enforced.limit), "{r:?}");
    assert_eq!(r.denied_by, None);
    // Both counters were charged: the shadow one is in debt.
    assert_eq!(ctx.remaining(&plain).await, vec![0]);
    assert_eq!(ctx.remaining(&enforced).await, vec![880]);
    // An enforced limit still denies, and nothing is charged.
    let r = ctx.check(&both, 900).await;
    assert!(!r.allowed);
    assert_eq!(r.denied_by.as_deref(), Some(enforced.limit.as_str()));
    assert_eq!(ctx.remaining(&enforced).await, vec![880]);
    // A trimmed check is granted what the enforced limits can pay, whatever the shadow one has.
    let req = CheckRequest {
        descriptors: both.clone(),
        reserve: Amount::tokens(1000),
        id: None,
        trim: Some(Trim {
            min: 10,
            fixed: Amount::ZERO,
        }),
        lease: None,
    };
    let r = ctx.limiter.check(&req).await.ok().unwrap();
    assert_eq!((r.allowed, r.granted), (true, Some(Amount::tokens(880))));
    assert_eq!(r.shadow_denied, vec![shadow.limit.clone()]);
}

/// `alerts`: a report that brings a counter's spend to a threshold raises it once per window
/// (a check's reservation alone never does, nor a duplicate report); one report past several
/// raises each; a later window raises again; money counts in micro units.
async fn alerts_are_raised_once_per_threshold_and_window(ctx: &Ctx) {
    let thresholds = |fs: &[f64]| fs.iter().filter_map(|f| wire::Threshold::of(*f)).collect();
    let d = Descriptor {
        alerts: thresholds(&[0.5, 0.8, 1.0]),
        ..ctx.d("al-tokens", "team", &[(100, 60)])
    };
    let money = Descriptor {
        alerts: thresholds(&[0.5]),
        currency: Some("USD".into()),
        ..ctx.d("al-money", "team", &[(1_000_000, 3600)])
    };
    let raised = |limit: &str, t: &str| -> u64 {
        let text = ctx.limiter.metrics().render("test", None);
        let line = format!("ratelimit_alerts_total{{limit=\"{limit}\",threshold=\"{t}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map_or(0, |n| n.parse().unwrap())
    };
    let all = |ctx_d: &Descriptor| ["0.5", "0.8", "1"].map(|t| raised(&ctx_d.limit, t));
    let ds = [d.clone()];
    let r = ctx.check(&ds, 60).await;
    assert!(r.allowed);
    assert_eq!(all(&d), [0, 0, 0], "a reservation alone raises nothing");
    ctx.report("al1", &ds, 30, 60).await;
    assert_eq!(all(&d), [0, 0, 0], "30 of 100");
    ctx.report("al2", &ds, 25, 0).await;
    assert_eq!(all(&d), [1, 0, 0], "55 of 100");
    ctx.report("al3", &ds, 1, 0).await;
    let again = ctx.report("al2", &ds, 25, 0).await;
    assert_eq!(again.duplicates, 1);
    assert_eq!(all(&d), [1, 0, 0], "raised once");
    ctx.report("al4", &ds, 50, 0).await;
    assert_eq!(all(&d), [1, 1, 1], "106 of 100: both thresholds at once");
    ctx.report("al5", &ds, 50, 0).await;
    assert_eq!(all(&d), [1, 1, 1]);
    // Both windows a sliding one weighs are over: the next one raises again.
    ctx.advance(120_000);
    ctx.report("al6", &ds, 60, 0).await;
    assert_eq!(all(&d), [2, 1, 1]);
    ctx.advance(-120_000);
    // Money: 0.60 of 1.00 USD.
    let req = ReportRequest {
        reports: vec![Report {
            spend: Vec::new(),
            id: ctx.report_id("al-money"),
            descriptors: vec![money.clone()],
            used: Amount::new(100, 600_000),
            reserved: Amount::ZERO,
            usage: None,
            reserved_at_ms: None,
            release: None,
        }],
    };
    assert_eq!(ctx.limiter.report(&req).await.ok().unwrap().accepted, 1);
    assert_eq!(raised(&money.limit, "0.5"), 1);
    // One counter named twice in a report is one counter: one alert.
    let twice = Descriptor {
        alerts: thresholds(&[0.5]),
        ..ctx.d("al-twice", "team", &[(100, 60)])
    };
    ctx.report("al-twice", &[twice.clone(), twice.clone()], 60, 0)
        .await;
    assert_eq!(raised(&twice.limit, "0.5"), 1);
    // Whoever may report chooses the thresholds: one batch raises at most 256 alerts.
    let many: Vec<Descriptor> = (0..64)
        .map(|i| Descriptor {
            alerts: thresholds(&[0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008]),
            ..ctx.d("al-flood", &format!("k{i}"), &[(100, 60)])
        })
        .collect();
    ctx.report("al-flood", &many, 1, 0).await;
    let text = ctx.limiter.metrics().render("test", None);
    let flood = format!("ratelimit_alerts_total{{limit=\"{}\"", many[0].limit);
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with(&flood))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 256);
    assert!(
        text.lines()
            .any(|l| l == "ratelimit_alerts_suppressed_total 256"),
        "{text}"
    );
}

/// `trim`: a reserve that does not fit gives way to the largest grant every limit can pay for,
/// tokens and money alike, taken atomically (concurrent grants never add up past a budget).
async fn trimmed_checks_serve_within_the_budget(ctx: &Ctx) {
    let trimmed = |ds: Vec<Descriptor>, reserve: Amount, min: u64, fixed: Amount| CheckRequest {
        descriptors: ds,
        reserve,
        id: None,
        trim: Some(Trim { min, fixed }),
        lease: None,
    };
    let check = |req: CheckRequest| async move { ctx.limiter.check(&req).await.ok().unwrap() };
    // 300 of 1,000 tokens left, a request for 1,000 (40 of them the prompt's).
    let d = ctx.d("trim", "alice", &[(1000, 60)]);
    ctx.report("t1", std::slice::from_ref(&d), 700, 0).await;
    let r = check(trimmed(
        vec![d.clone()],
        Amount::tokens(1000),
        100,
        Amount::tokens(40),
    ))
    .await;
    assert!(r.allowed);
    assert_eq!(r.granted, Some(Amount::tokens(300)));
    assert_eq!(r.limits[0].remaining, 0);
    // Below the least worth serving: refused as before.
    let r = check(trimmed(
        vec![d.clone()],
        Amount::tokens(1000),
        100,
        Amount::ZERO,
    ))
    .await;
    assert!(!r.allowed);
    assert_eq!(r.granted, None);
    // A reserve that fits is taken whole, and says nothing of a grant.
    let roomy = ctx.d("trim-roomy", "alice", &[(1000, 60)]);
    let r = check(trimmed(vec![roomy], Amount::tokens(500), 100, Amount::ZERO)).await;
    assert_eq!((r.allowed, r.granted), (true, None));
    // One beyond a whole budget is not admitted whole (as an untrimmed one is): it gets the
    // budget.
    let whole = ctx.d("trim-whole", "alice", &[(1000, 60)]);
    let r = check(trimmed(
        vec![whole],
        Amount::tokens(50_000),
        100,
        Amount::ZERO,
    ))
    .await;
    assert_eq!((r.allowed, r.granted), (true, Some(Amount::tokens(1000))));

    // Ten concurrent trimmed checks on 300 tokens: the grants add up to exactly 300.
    let shared = ctx.d("trim-race", "bob", &[(300, 60)]);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (limiter, req) = (
            ctx.limiter.clone(),
            trimmed(vec![shared.clone()], Amount::tokens(100), 20, Amount::ZERO),
        );
        tasks.push(tokio::spawn(async move {
            let r = limiter.check(&req).await.ok().unwrap();
            if r.allowed {
                r.granted.map_or(100, |g| g.tokens)
            } else {
                0
            }
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    assert_eq!(granted, 300);

    // Money the same: 1.50 USD left of 20.00; a reserve of 1,000 tokens costing 5.00 USD, of
    // which the prompt (100 tokens) costs 0.50: 5,000 micro units per further token.
    let tokens = ctx.d("trim-tokens", "carol", &[(10_000, 60)]);
    let money = calendar(
        &ctx.d("trim-spend", "carol", &[(20_000_000, 0)]),
        Period::Day,
        "UTC",
        Some("USD"),
    );
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("trim-spent"),
        descriptors: vec![money.clone()],
        used: Amount::new(0, 18_500_000),
        ..Default::default()
    })
    .await;
    let r = check(trimmed(
        vec![tokens.clone(), money.clone()],
        Amount::new(1000, 5_000_000),
        150,
        Amount::new(100, 500_000),
    ))
    .await;
    assert!(r.allowed);
    assert_eq!(r.granted, Some(Amount::new(300, 1_500_000)));
    assert_eq!(
        r.limits.iter().map(|l| l.remaining).collect::<Vec<_>>(),
        [9_700, 0]
    );
}

/// Quota leases: a lease is a reservation taken whole or not at all, only while the counters
/// are far from their limits (a tenth of what remains, by default), never past its window,
/// settled by the reports of the requests admitted under it and the plugin's give-back, and
/// released by id when the plugin never saw its answer.
async fn leases_are_reservations_taken_whole_or_not_at_all(ctx: &Ctx) {
    let d = ctx.d("lease", "alice", &[(100_000, 3600)]);
    let ds = std::slice::from_ref(&d);
    let ask = |seq: u64, tokens: u64| CheckRequest {
        descriptors: vec![d.clone()],
        lease: Some(LeaseAsk {
            id: ctx.id(seq),
            amount: Amount::tokens(tokens),
        }),
        ..Default::default()
    };
    let lease = |r: CheckResponse| r.lease.expect("a lease answer");
    let granted = lease(ctx.limiter.check(&ask(10, 5_000)).await.ok().unwrap());
    assert_eq!(granted.granted, Some(Amount::tokens(5_000)));
    assert_eq!((granted.room.tokens, granted.ttl_ms), (10_000, 2_000));
    assert_eq!(ctx.remaining(&d).await, vec![95_000]);
    // Leases hold at most a tenth of what remains, leases included: 5,000 more, no further.
    let declined = lease(ctx.limiter.check(&ask(11, 5_001)).await.ok().unwrap());
    assert_eq!((declined.granted, declined.room.tokens), (None, 5_000));
    assert_eq!(ctx.remaining(&d).await, vec![95_000]);
    // A request admitted under the lease reports against its share, in the lease's window;
    // the plugin gives back what was left when the lease ends.
    let at = Some(granted.reserved_at_ms);
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("lease-request"),
        descriptors: vec![d.clone()],
        used: Amount::tokens(300),
        reserved: Amount::tokens(400),
        reserved_at_ms: at,
        ..Default::default()
    })
    .await;
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("lease-end"),
        descriptors: vec![d.clone()],
        reserved: Amount::tokens(4_600),
        reserved_at_ms: at,
        ..Default::default()
    })
    .await;
    assert_eq!(ctx.remaining(&d).await, vec![99_700]);
    // An answer the plugin never saw: its release gives the lease back, once.
    assert!(
        lease(ctx.limiter.check(&ask(12, 3_000)).await.ok().unwrap())
            .granted
            .is_some()
    );
    assert_eq!(ctx.remaining(&d).await, vec![96_700]);
    let release = Report {
        spend: Vec::new(),
        id: ctx.report_id("lease-release"),
        descriptors: vec![d.clone()],
        reserved: Amount::tokens(3_000),
        release: Some(ctx.id(12)),
        ..Default::default()
    };
    ctx.settle(release.clone()).await;
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("lease-release-again"),
        ..release
    })
    .await;
    assert_eq!(ctx.remaining(&d).await, vec![99_700]);
    // Released before the ask arrives: nothing is taken.
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("lease-early-release"),
        descriptors: vec![d.clone()],
        reserved: Amount::tokens(2_000),
        release: Some(ctx.id(13)),
        ..Default::default()
    })
    .await;
    let late = lease(ctx.limiter.check(&ask(13, 2_000)).await.ok().unwrap());
    assert_eq!(late.granted, None);
    assert_eq!(ctx.remaining(&d).await, vec![99_700]);
    // Near the limit no lease is worth its ask: checks are what admits. (Past two leases'
    // lives the leases granted above no longer count as held.)
    ctx.report("lease-spent", ds, 95_000, 0).await;
    ctx.advance(4_001);
    let near = lease(ctx.limiter.check(&ask(14, 1_000)).await.ok().unwrap());
    assert_eq!((near.granted, near.room.tokens), (None, 470));
    // A shadow limit's counter bounds the room too; a service rule's bucket allows none.
    let shadow = Descriptor {
        shadow: true,
        ..ctx.d("lease-shadow", "alice", &[(1_000, 3600)])
    };
    let fresh = ctx.d("lease", "bob", &[(100_000, 3600)]);
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![fresh.clone(), shadow],
            ..ask(15, 500)
        })
        .await
        .ok()
        .unwrap();
    assert_eq!(
        (lease(r).granted, ctx.remaining(&fresh).await),
        (None, vec![100_000])
    );
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![ctx.d("rules", "bucket-lease", &[])],
            ..ask(16, 5)
        })
        .await
        .ok()
        .unwrap();
    assert_eq!(lease(r), LeaseAnswer::default());
    // A lease ends with the window it was taken in (one second left of it).
    ctx.advance(3_599_000 - 4_001);
    let end = lease(
        ctx.limiter
            .check(&CheckRequest {
                descriptors: vec![fresh.clone()],
                ..ask(17, 1_000)
            })
            .await
            .ok()
            .unwrap(),
    );
    assert!(end.granted.is_some() && end.ttl_ms <= 1_000, "{end:?}");
    // Many users share one global counter: their leases together hold at most a tenth of
    // what remains on it, leases included.
    let global = ctx.d("lease-global", "all", &[(1_000_000, 3600)]);
    let mut granted = 0;
    for user in 0..40 {
        let mine = ctx.d("lease-user", &format!("u{user}"), &[(1_000_000, 3600)]);
        let r = ctx
            .limiter
            .check(&CheckRequest {
                descriptors: vec![mine, global.clone()],
                ..ask(100 + user, 20_000)
            })
            .await
            .ok()
            .unwrap();
        granted += lease(r).granted.map_or(0, |g| g.tokens);
    }
    assert_eq!(granted, 100_000, "five of forty");
    assert_eq!(ctx.remaining(&global).await, vec![900_000]);
    // A denied check gets no lease answer.
    let denied = ctx
        .limiter
        .check(&CheckRequest {
            reserve: Amount::tokens(200_000),
            ..ask(18, 1_000)
        })
        .await
        .ok()
        .unwrap();
    assert!(!denied.allowed && denied.lease.is_none());
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(&super::Ctx::memory()).await; } )*

            #[tokio::test]
            async fn fixed_windows_reset_at_the_boundary() {
                let ctx = super::Ctx::memory().with_fixed_windows();
                super::fixed_windows(&ctx).await;
            }
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   let server = testkit::redis::RedisServer::start();
                   super::$name(&super::Ctx::redis(&[server.url()], "")).await;
               } )*
        }
        /// Every scenario on one three-node cluster, each in its own key space.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis_cluster_runs_the_whole_suite() {
            let cluster = RedisCluster::start();
            $( $name(&Ctx::redis(&[cluster.url()], concat!(stringify!($name), "/"))).await; )*
        }
    };
}

async fn fixed_windows(ctx: &Ctx) {
    let d = ctx.d("fixed", "x", &[(10, 60)]);
    ctx.advance(5_000);
    ctx.report("f1", std::slice::from_ref(&d), 10, 0).await;
    ctx.advance(15_000);
    let r = ctx.check(std::slice::from_ref(&d), 0).await;
    assert_eq!(
        (r.allowed, r.limits[0].reset_ms, r.retry_after_ms),
        (false, 40_000, 40_000)
    );
    ctx.advance(40_000);
    assert_eq!(ctx.remaining(&d).await, vec![10]);
}

/// A reservation at second 57 whose small answer lands at second 61 gives its unused part
/// back to the window that held it (sliding: the previous window, which still weighs in;
/// fixed: nowhere, that window is over), never to the new window.
async fn late_refunds_never_enlarge_the_next_window(ctx: &Ctx) {
    for (ctx, sliding) in [(ctx, true), (&ctx.with_fixed_windows(), false)] {
        let d = ctx.d("late", "alice", &[(1000, 60)]);
        ctx.advance(57_000);
        let id = ctx.id(if sliding { 1 } else { 2 });
        let r = ctx.check_as(std::slice::from_ref(&d), 1000, &id).await;
        assert!(r.allowed);
        let at = r.reserved_at_ms.expect("the answer says when it reserved");
        assert_eq!(at as i64, T0 + 57_000);
        ctx.advance(4_000);
        ctx.settle(Report {
            spend: Vec::new(),
            id: ctx.report_id(&id),
            descriptors: vec![d.clone()],
            used: Amount::tokens(10),
            reserved: Amount::tokens(1000),
            reserved_at_ms: Some(at),
            release: None,
            usage: None,
        })
        .await;
        let mut admitted = 0;
        for i in 0..12 {
            if ctx
                .check_as(std::slice::from_ref(&d), 200, &ctx.id(100 + i))
                .await
                .allowed
            {
                admitted += 1;
            }
        }
        // Sliding: the 10 tokens used still weigh in (990 left, 4 × 200); fixed: 5 × 200.
        assert_eq!(admitted, if sliding { 4 } else { 5 }, "sliding: {sliding}");
        ctx.advance(-61_000);
    }
}

/// A replica whose clock is a few milliseconds behind counts in the newer window.
async fn a_clock_behind_never_moves_a_window_back(ctx: &Ctx) {
    for ctx in [ctx, &ctx.with_fixed_windows()] {
        let d = ctx.d("skew", "x", &[(100, 60)]);
        ctx.advance(60_001);
        ctx.report("s1", std::slice::from_ref(&d), 30, 0).await;
        ctx.advance(-2);
        ctx.report("s2", std::slice::from_ref(&d), 30, 0).await;
        assert_eq!(ctx.remaining(&d).await, vec![40]);
        ctx.advance(3);
        assert_eq!(ctx.remaining(&d).await, vec![40]);
        ctx.advance(-60_002);
    }
}

/// Releases (reports of checks whose answer the plugin never saw) give a reservation back
/// only if the check took one, once, and keep a check that arrives after its release from
/// reserving.
async fn releases_give_back_only_reservations_taken(ctx: &Ctx) {
    let d = ctx.d("release", "x", &[(1000, 3600)]);
    let ds = std::slice::from_ref(&d);
    let release = |seq: u64, tokens: u64, reserved: u64| Report {
        spend: Vec::new(),
        id: ctx.report_id(&format!("release-{seq}")),
        descriptors: vec![d.clone()],
        used: Amount::tokens(tokens),
        reserved: Amount::tokens(reserved),
        reserved_at_ms: None,
        release: Some(ctx.id(seq)),
        usage: None,
    };
    // Taken, then released: all back.
    assert!(ctx.check_as(ds, 300, &ctx.id(1)).await.allowed);
    assert_eq!(ctx.remaining(&d).await, vec![700]);
    assert_eq!(ctx.settle(release(1, 0, 300)).await.accepted, 1);
    assert_eq!(ctx.remaining(&d).await, vec![1000]);
    assert_eq!(ctx.settle(release(1, 0, 300)).await.duplicates, 1);
    assert_eq!(ctx.remaining(&d).await, vec![1000]);
    // Released before its check arrives: the usage is charged, the late check takes nothing.
    ctx.settle(release(2, 50, 300)).await;
    assert_eq!(ctx.remaining(&d).await, vec![950]);
    let late = ctx.check_as(ds, 300, &ctx.id(2)).await;
    assert!(late.allowed && late.reserved_at_ms.is_none());
    assert_eq!(ctx.remaining(&d).await, vec![950]);
    // A denied check reserved nothing: its release gives nothing back.
    assert!(!ctx.check_as(ds, 5000, &ctx.id(3)).await.allowed);
    ctx.settle(release(3, 0, 5000)).await;
    assert_eq!(ctx.remaining(&d).await, vec![950]);
    // The usage of a request let through after its check timed out, with the reservation the
    // service did take: charged once.
    assert!(ctx.check_as(ds, 400, &ctx.id(4)).await.allowed);
    ctx.settle(release(4, 120, 400)).await;
    assert_eq!(ctx.remaining(&d).await, vec![830]);
    // Ids in another form cannot be looked up: nothing is given back.
    ctx.settle(Report {
        spend: Vec::new(),
        release: Some("foreign".into()),
        ..release(0, 30, 500)
    })
    .await;
    assert_eq!(ctx.remaining(&d).await, vec![800]);
}

/// A release settles as a refund does: in the period its reservation was taken in. Reserve on
/// the last day of a month, spend in the next, then release the old reservation: the new
/// month's spending stands (it used to be given the release, its budget whole again).
async fn a_release_refunds_the_window_of_its_reservation(ctx: &Ctx) {
    // T0 is 2024-10-04T00:00Z; October ends in UTC 27 days and 24 hours later.
    let d = calendar(
        &ctx.d("release-month", "team", &[(1000, 0)]),
        Period::Month,
        "UTC",
        None,
    );
    let ds = std::slice::from_ref(&d);
    let end = T0 + 28 * 86_400_000;
    ctx.advance(end - T0 - 60_000);
    let taken = ctx.check_as(ds, 1000, &ctx.id(7)).await;
    assert!(taken.allowed);
    let reserved_at = taken.reserved_at_ms.unwrap();
    ctx.advance(120_000);
    ctx.report("december-spend", ds, 900, 0).await;
    assert_eq!(ctx.remaining(&d).await, [100]);
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("release-7"),
        descriptors: vec![d.clone()],
        used: Amount::tokens(0),
        reserved: Amount::tokens(1000),
        reserved_at_ms: Some(reserved_at),
        release: Some(ctx.id(7)),
        ..Default::default()
    })
    .await;
    assert_eq!(
        ctx.remaining(&d).await,
        [100],
        "the new month keeps what it spent"
    );
}

/// A counter's identity is (limit, value, window or period), never its budget: raising or
/// lowering a budget mid-window (an edit, or a rolling deploy where old and new Envoys send
/// different budgets) keeps what was spent. It used to hand the key a fresh window.
async fn editing_a_budget_keeps_what_was_spent(ctx: &Ctx) {
    let at = |tokens: u64| ctx.d("edited", "ann", &[(tokens, 3600)]);
    ctx.report("edit-1", &[at(1000)], 1000, 0).await;
    assert!(!ctx.check(&[at(1000)], 0).await.allowed);
    assert_eq!(
        ctx.remaining(&at(1001)).await,
        [1],
        "raised by one: one left"
    );
    assert!(
        !ctx.check(&[at(500)], 0).await.allowed,
        "lowered: still spent"
    );
    assert_eq!(ctx.remaining(&at(1000)).await, [0]);
    // A monthly budget in money, edited mid-month.
    let month = |budget: u64| {
        calendar(
            &ctx.d("edited-spend", "team", &[(budget, 0)]),
            Period::Month,
            "UTC",
            Some("USD"),
        )
    };
    ctx.settle(Report {
        spend: Vec::new(),
        id: ctx.report_id("edit-2"),
        descriptors: vec![month(20_000_000)],
        used: Amount::new(0, 15_000_000),
        ..Default::default()
    })
    .await;
    assert_eq!(ctx.remaining(&month(20_000_000)).await, [5_000_000]);
    assert_eq!(ctx.remaining(&month(25_000_000)).await, [10_000_000]);
    assert_eq!(ctx.remaining(&month(10_000_000)).await, [0]);
    // What an operator reads is the budget last applied.
    let q = ctx
        .limiter
        .quota(&format!("{}edited", ctx.ns), "ann", false)
        .await
        .ok()
        .unwrap();
    assert_eq!((q[0].budget, q[0].remaining), (1000, 0));
}

suite!(
    leases_are_reservations_taken_whole_or_not_at_all,
    alerts_are_raised_once_per_threshold_and_window,
    trimmed_checks_serve_within_the_budget,
    shadow_limits_count_and_never_deny,
    editing_a_budget_keeps_what_was_spent,
    a_release_refunds_the_window_of_its_reservation,
    calendar_months_reset_at_their_start_in_their_zone,
    money_and_tokens_are_counted_apart,
    late_refunds_never_enlarge_the_next_window,
    a_clock_behind_never_moves_a_window_back,
    releases_give_back_only_reservations_taken,
    admits_down_to_the_last_token,
    reserve_needs_room_and_is_taken_from_every_descriptor,
    reserve_larger_than_the_budget_needs_a_full_budget,
    retried_reports_are_charged_once,
    sliding_window_arithmetic,
    debt_and_refunds,
    service_owned_buckets,
    counters_never_collide,
    concurrent_reports_balance_exactly,
    concurrent_reservations_never_overshoot,
    asm_endpoints,
    bad_requests_are_refused,
);

/// The same random sequence of checks with reservations, releases, reports (new, retried,
/// far too old) and clock steps, against the memory store and a real Redis: every answer and
/// every balance agree, so the Lua rings and windows are the Rust ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_agree_on_a_random_history() {
    let server = RedisServer::start();
    let stores = [Ctx::memory(), Ctx::redis(&[server.url()], "")];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut roll = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut check_seq, mut report_seq) = (0u64, 0u64);
    for step in 0..1500 {
        let user = format!("u{}", roll(4));
        let d = stores[0].d("diff", &user, &[(500, 60), (5000, 3600)]);
        let what = roll(10);
        let mut answers = Vec::new();
        let advance = roll(20_000) as i64;
        let reserve = roll(4) * 50;
        let tokens = roll(120);
        // Mostly new ids, sometimes a retry of a recent one, sometimes one far too old.
        let report_id = match roll(10) {
            0 => report_seq.saturating_sub(roll(5)),
            1 => report_seq.saturating_sub(wire::REPORT_WINDOW + 10),
            _ => {
                report_seq += 1;
                report_seq
            }
        }
        .max(1);
        let check_id = match roll(6) {
            0 => check_seq.saturating_sub(roll(5)),
            _ => {
                check_seq += 1;
                check_seq
            }
        }
        .max(1);
        for ctx in &stores {
            let answer = match what {
                0..=3 => {
                    let r = ctx
                        .check_as(std::slice::from_ref(&d), reserve, &ctx.id(check_id))
                        .await;
                    json!({"allowed": r.allowed, "reserved": r.reserved_at_ms.is_some(),
                           "limits": r.limits.iter().map(|l| (l.remaining, l.reset_ms)).collect::<Vec<_>>()})
                }
                4..=7 => {
                    let r = ctx
                        .settle(Report {
                            spend: Vec::new(),
                            id: ctx.id(report_id),
                            descriptors: vec![d.clone()],
                            used: Amount::tokens(tokens),
                            reserved: Amount::tokens(reserve),
                            reserved_at_ms: Some((T0 + 1) as u64),
                            release: (what == 7).then(|| ctx.id(check_id)),
                            usage: None,
                        })
                        .await;
                    json!(r.results.iter().map(|o| o.outcome).collect::<Vec<_>>())
                }
                _ => {
                    ctx.advance(advance);
                    json!(null)
                }
            };
            answers.push((answer, ctx.remaining(&d).await));
        }
        assert_eq!(answers[0], answers[1], "step {step} (op {what})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_checks_and_recovers_by_itself() {
    let mut server = RedisServer::start();
    let ctx = Ctx::redis(&[server.url()], "");
    let d = ctx.d("outage", "x", &[(100, 60)]);
    assert!(ctx.check(std::slice::from_ref(&d), 0).await.allowed);
    server.kill();
    let r = ctx
        .limiter
        .check(&CheckRequest {
            descriptors: vec![d.clone()],
            reserve: Amount::tokens(0),
            id: None,
            trim: None,
            lease: None,
        })
        .await;
    assert!(
        matches!(r, Err(Failure::Store(_))),
        "a check without its store must fail, not guess"
    );
    assert!(ctx.limiter.store().ready().await.is_err());
    server.start_again();
    let mut recovered = false;
    for _ in 0..100 {
        if ctx
            .limiter
            .check(&CheckRequest {
                descriptors: vec![d.clone()],
                reserve: Amount::tokens(0),
                id: None,
                trim: None,
                lease: None,
            })
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store must reconnect by itself");
    assert!(ctx.limiter.store().ready().await.is_ok());
    assert!(
        ctx.limiter
            .metrics()
            .store_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn redis_started_after_the_service() {
    let port = testkit::free_port();
    let ctx = Ctx::redis(&[format!("redis://127.0.0.1:{port}")], "");
    assert!(ctx.limiter.store().ready().await.is_err());
    let _late = RedisServer::start_on(port);
    assert!(ctx.limiter.store().ready().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flush_is_survived() {
    let server = RedisServer::start();
    let ctx = Ctx::redis(&[server.url()], "");
    let d = ctx.d("flush", "x", &[(100, 60)]);
    ctx.report("f1", std::slice::from_ref(&d), 10, 0).await;
    // Redis restarted with a fresh script cache, or a failover: EVALSHA answers NOSCRIPT.
    assert!(testkit::redis::command(server.port, &["SCRIPT", "FLUSH"])
        .unwrap()
        .contains("OK"));
    assert_eq!(ctx.remaining(&d).await, vec![90]);
}

/// One clock: the service's clock runs 5 s behind Redis's, just after an hour began by Redis's
/// time. The service would plan the hour that has ended (whose spending Redis's time no longer
/// counts, so every check looked fresh); the script finds Redis's time in another period and
/// the service plans again at it, so the hour's budget holds from the first check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_clock_behind_redis_plans_redis_periods() {
    let server = RedisServer::start();
    let now = ratelimit_service::clock::system_ms();
    // Far enough into the hour that the test ends in it; the service 5 s before it began.
    let into_hour = now.rem_euclid(3_600_000);
    if into_hour > 3_500_000 {
        tokio::time::sleep(Duration::from_millis((3_600_000 - into_hour + 1000) as u64)).await;
    }
    let into_hour = ratelimit_service::clock::system_ms().rem_euclid(3_600_000);
    let skew = -(into_hour + 5_000);
    let limiter = Limiter::new(
        Store::Redis(Arc::new(RedisStore::new(
            RedisTarget::parse(&[server.url()]).unwrap(),
            Duration::from_millis(1000),
        ))),
        Rules::default(),
        Clock::Skewed(skew),
        true,
    );
    let d = Descriptor {
        limit: "skew".into(),
        value: "team".into(),
        rates: vec![Rate {
            budget: 100,
            window_s: Period::Hour.longest_s(),
            calendar: Some(Calendar {
                period: Period::Hour,
                timezone: "UTC".into(),
            }),
        }],
        ..Default::default()
    };
    let check = |reserve: u64| CheckRequest {
        descriptors: vec![d.clone()],
        reserve: Amount::tokens(reserve),
        ..Default::default()
    };
    let spent = limiter.check(&check(100)).await.ok().unwrap();
    assert!(spent.allowed);
    let again = limiter.check(&check(1)).await.ok().unwrap();
    assert!(!again.allowed, "the hour's budget is spent: {again:?}");
    assert_eq!(again.limits[0].remaining, 0);
    // Reports land in Redis's hour too.
    let report = Report {
        spend: Vec::new(),
        id: SeqId { source: 77, seq: 1 }.format(),
        descriptors: vec![d.clone()],
        used: Amount::tokens(0),
        reserved: Amount::tokens(100),
        reserved_at_ms: spent.reserved_at_ms,
        ..Default::default()
    };
    let r = limiter
        .report(&ReportRequest {
            reports: vec![report],
        })
        .await
        .ok()
        .unwrap();
    assert_eq!(r.accepted, 1);
    assert_eq!(
        limiter.check(&check(0)).await.ok().unwrap().limits[0].remaining,
        100,
        "the refund went back to the hour it was reserved in"
    );
}

/// Restarting the service with the other `--window` keeps what was spent (the state is the same
/// for sliding and fixed windows), and a state written under the name that held the budget
/// (before budgets left a counter's identity) is adopted, not lost, by the first check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_outlive_a_window_change_and_an_upgrade() {
    let server = RedisServer::start();
    let sliding = Ctx::redis_with(&[server.url()], "w/", true);
    let d = sliding.d("per-user", "ann", &[(1000, 3600)]);
    sliding
        .report("w-1", std::slice::from_ref(&d), 600, 0)
        .await;
    let fixed = Ctx::redis_with(&[server.url()], "w/", false);
    fixed
        .clock
        .advance(sliding.clock.now_ms() - fixed.clock.now_ms());
    assert_eq!(fixed.remaining(&d).await, [400]);
    // An older service's field: the budget in its name, no budget beside its state.
    let old = sliding.d("per-team", "blue", &[(1000, 3600)]);
    let key = ratelimit_service::counter::CounterId {
        limit: old.limit.clone(),
        value: old.value.clone(),
        shared: false,
    }
    .storage_key();
    let state = format!("{T0},700,0");
    testkit::redis::command(server.port, &["HSET", &key, "w:1000:3600000", &state]).unwrap();
    assert_eq!(sliding.remaining(&old).await, [300], "adopted");
    let has = |field: &str| {
        testkit::redis::command(server.port, &["HEXISTS", &key, field])
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        (has("t:3600000"), has("w:1000:3600000")),
        (":1".into(), ":0".into())
    );
}
