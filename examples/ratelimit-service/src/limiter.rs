//! The service's decisions: requests in, descriptors turned into counters, the store asked,
//! answers out. Transport-free, so the behavioural suite drives it directly.

use std::time::Instant;

use crate::api::*;
use crate::clock::Clock;
use crate::counter::{CounterId, Plan};
use crate::meter::{Meter, Status};
use crate::metrics::{inc, Metrics};
use crate::rules::Rules;
use crate::store::{Store, StoreError};

/// Why a request got no decision.
#[derive(Debug)]
pub enum Failure {
    Bad(BadRequest),
    Store(StoreError),
}

impl From<BadRequest> for Failure {
    fn from(b: BadRequest) -> Failure {
        Failure::Bad(b)
    }
}

pub struct Limiter {
    pub store: Store,
    pub rules: Rules,
    pub clock: Clock,
    pub metrics: Metrics,
    /// Plugin-owned rates: sliding windows (default) or fixed windows.
    pub sliding: bool,
}

impl Limiter {
    pub fn new(store: Store, rules: Rules, clock: Clock, sliding: bool) -> Limiter {
        Limiter {
            store,
            rules,
            clock,
            metrics: Metrics::default(),
            sliding,
        }
    }

    /// The counters a descriptor spends; `None` when it is not limited (a service-owned limit
    /// no rule matches).
    fn plan(&self, d: &Descriptor) -> Option<Plan> {
        let meters = if d.rates.is_empty() {
            vec![self.rules.meter_for(&d.value)?]
        } else {
            d.rates
                .iter()
                .map(|r| Meter::Window {
                    tokens: r.tokens as i64,
                    window_ms: r.window_s as i64 * 1000,
                    sliding: self.sliding,
                })
                .collect()
        };
        Some(Plan {
            id: CounterId {
                limit: d.limit.clone(),
                value: d.value.clone(),
                shared: d.shared,
            },
            meters,
        })
    }

    fn store_failed(&self, e: StoreError) -> Failure {
        inc(&self.metrics.store_errors);
        tracing::warn!("{e}");
        Failure::Store(e)
    }

    pub async fn check(&self, req: &CheckRequest) -> Result<CheckResponse, Failure> {
        let started = Instant::now();
        validate_check(req).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let plans: Vec<Plan> = req
            .descriptors
            .iter()
            .filter_map(|d| self.plan(d))
            .collect();
        let outcome = match self
            .store
            .check(&plans, req.reserve as i64, self.clock.now_ms())
            .await
        {
            Ok(o) => o,
            Err(e) => {
                inc(&self.metrics.checks_failed);
                return Err(self.store_failed(e));
            }
        };
        let mut limits = Vec::new();
        let mut worst: Option<(i64, &str)> = None;
        for (plan, statuses) in plans.iter().zip(&outcome.statuses) {
            for (meter, st) in plan.meters.iter().zip(statuses) {
                limits.push(limit_status(&plan.id, meter, st));
                if !outcome.allowed && st.retry_ms > worst.map_or(0, |w| w.0) {
                    worst = Some((st.retry_ms, plan.id.limit.as_str()));
                }
            }
        }
        if outcome.allowed {
            inc(&self.metrics.checks_allowed);
            if req.reserve > 0 {
                self.metrics.charged(req.reserve as i64);
            }
        } else {
            inc(&self.metrics.checks_denied);
        }
        self.metrics.observe_check(started.elapsed());
        Ok(CheckResponse {
            allowed: outcome.allowed,
            limits,
            retry_after_ms: worst.map_or(0, |w| w.0 as u64),
            denied_by: worst.map(|w| w.1.to_string()),
        })
    }

    pub async fn report(&self, req: &ReportRequest) -> Result<ReportResponse, Failure> {
        validate_reports(req).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let now = self.clock.now_ms();
        let mut answer = ReportResponse {
            accepted: 0,
            duplicates: 0,
        };
        for r in &req.reports {
            let plans: Vec<Plan> = r.descriptors.iter().filter_map(|d| self.plan(d)).collect();
            let delta = r.tokens as i64 - r.reserved as i64;
            match self.store.charge(Some(&r.id), &plans, delta, now).await {
                Ok(true) => {
                    inc(&self.metrics.reports_accepted);
                    self.metrics.charged(delta);
                    answer.accepted += 1;
                }
                Ok(false) => {
                    inc(&self.metrics.reports_duplicate);
                    answer.duplicates += 1;
                }
                Err(e) => {
                    // Reports before this one are applied and will be duplicates on retry.
                    inc(&self.metrics.reports_failed);
                    return Err(self.store_failed(e));
                }
            }
        }
        Ok(answer)
    }

    fn asm_plans(&self, keys: &[String]) -> Vec<Plan> {
        keys.iter()
            .filter_map(|k| {
                let meter = self.rules.meter_for(k)?;
                Some(Plan {
                    id: CounterId {
                        limit: String::new(),
                        value: k.clone(),
                        shared: false,
                    },
                    meters: vec![meter],
                })
            })
            .collect()
    }

    /// ASM `GET /ratelimit`: one token must be left in every key's bucket.
    pub async fn asm_check(&self, keys: &[String]) -> Result<AsmCheckResponse, Failure> {
        let started = Instant::now();
        validate_asm_keys(keys).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let plans = self.asm_plans(keys);
        let outcome = match self.store.check(&plans, 0, self.clock.now_ms()).await {
            Ok(o) => o,
            Err(e) => {
                inc(&self.metrics.checks_failed);
                return Err(self.store_failed(e));
            }
        };
        self.metrics.observe_check(started.elapsed());
        if outcome.allowed {
            inc(&self.metrics.checks_allowed);
            return Ok(AsmCheckResponse {
                allow: true,
                description: String::new(),
            });
        }
        inc(&self.metrics.checks_denied);
        let denied = plans
            .iter()
            .zip(&outcome.statuses)
            .find(|(_, st)| st.iter().any(|s| s.retry_ms > 0))
            .map_or("", |(p, _)| p.id.value.as_str());
        Ok(AsmCheckResponse {
            allow: false,
            description: format!("{denied} is being rate-limited"),
        })
    }

    /// ASM `POST /update_ratelimit_record`: charge `total_tokens` (or prompt + completion) to
    /// every key. The protocol has no ids, so a retried update is charged again.
    pub async fn asm_update(&self, u: &AsmUpdate) -> Result<(), Failure> {
        validate_asm_keys(&u.ratelimit_keys).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let tokens = if u.total_tokens > 0 {
            u.total_tokens
        } else {
            u.prompt_tokens.saturating_add(u.completion_tokens)
        };
        let tokens = tokens.min(MAX_TOKENS) as i64;
        let plans = self.asm_plans(&u.ratelimit_keys);
        match self
            .store
            .charge(None, &plans, tokens, self.clock.now_ms())
            .await
        {
            Ok(_) => {
                inc(&self.metrics.reports_accepted);
                self.metrics.charged(tokens);
                Ok(())
            }
            Err(e) => {
                inc(&self.metrics.reports_failed);
                Err(self.store_failed(e))
            }
        }
    }

    /// Read-only view of one counter for operators (`GET /v1/quota`).
    pub async fn quota(
        &self,
        limit: &str,
        value: &str,
        shared: bool,
    ) -> Result<Vec<LimitStatus>, Failure> {
        let id = CounterId {
            limit: limit.to_string(),
            value: value.to_string(),
            shared,
        };
        let plan = Plan {
            id: id.clone(),
            meters: Vec::new(),
        };
        let meters = self
            .store
            .peek(&plan, self.clock.now_ms())
            .await
            .map_err(|e| self.store_failed(e))?;
        Ok(meters
            .iter()
            .map(|(m, st)| limit_status(&id, m, st))
            .collect())
    }
}

fn limit_status(id: &CounterId, meter: &Meter, st: &Status) -> LimitStatus {
    let window_ms = match *meter {
        Meter::Window { window_ms, .. } => window_ms,
        Meter::Bucket { interval_ms, .. } => interval_ms,
    };
    LimitStatus {
        limit: id.limit.clone(),
        value: id.value.clone(),
        tokens: st.limit.max(0) as u64,
        window_s: (window_ms / 1000).max(0) as u64,
        remaining: st.remaining.max(0) as u64,
        reset_ms: st.reset_ms.max(0) as u64,
    }
}
