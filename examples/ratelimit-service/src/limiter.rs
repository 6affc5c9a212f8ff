//! The service's decisions: requests in, descriptors turned into counters, the store asked,
//! answers out. Transport-free, so the behavioural suite drives it directly.

use std::sync::Arc;
use std::time::Instant;

use crate::alerts::{Alerts, Raised, Webhook};
use crate::api::*;
use crate::calendar;
use crate::clock::Clock;
use crate::console::board::{self, Denial};
use crate::console::insights::{ConsoleEvent, Insights, Tally};
use crate::counter::{CounterId, Plan};
use crate::lease::{self, Leasing, Ledger};
use crate::ledger::restore::Restored;
use crate::ledger::{storable, Entry, RowKey, SpendLedger, Sums};
use crate::meter::{counted, Meter, Money, Status};
use crate::metrics::{inc, Metrics};
use crate::rules::Rules;
use crate::store::sources::Mark;
use crate::store::{Applied, CheckOutcome, Crossing, Settlement, Store, StoreError};

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

/// Decides: plans the counters a request's descriptors spend, asks the store, answers, and
/// tells the console's [`Insights`] what reached the counters.
pub struct Limiter {
    store: Store,
    /// The console's sink, beside the counters.
    insights: Insights,
    rules: Rules,
    clock: Clock,
    metrics: Metrics,
    /// Plugin-owned rates: sliding windows (default) or fixed windows.
    sliding: bool,
    /// Redis's clock less this limiter's, as the last script answer showed it: calendar periods
    /// are planned at Redis's time, the one the store counts on.
    redis_offset_ms: std::sync::atomic::AtomicI64,
    /// Where alerts raised by reports go (besides the metrics, the log and the console).
    alerts: Alerts,
    /// Whether and how much a check's [`wire::LeaseAsk`] may take.
    leasing: Leasing,
    /// What this replica leased on each counter lately.
    leased: Ledger,
    /// Where what reports' requests spent is kept for good (`--ledger`).
    spend_ledger: Option<Arc<SpendLedger>>,
    /// Which calendar counters were looked at for restoring from the ledger.
    restored: Restored,
}

impl Limiter {
    pub fn new(store: Store, rules: Rules, clock: Clock, sliding: bool) -> Limiter {
        Limiter {
            insights: Insights::beside(&store),
            store,
            rules,
            clock,
            metrics: Metrics::default(),
            sliding,
            redis_offset_ms: std::sync::atomic::AtomicI64::new(0),
            alerts: Alerts::new(None, Default::default()),
            leasing: Leasing::default(),
            leased: Ledger::default(),
            spend_ledger: None,
            restored: Restored::default(),
        }
    }

    /// Keeps what applied reports' requests spent in `ledger`.
    pub fn with_ledger(mut self, ledger: Option<Arc<SpendLedger>>) -> Limiter {
        self.spend_ledger = ledger;
        self
    }

    pub fn spend_ledger(&self) -> Option<&Arc<SpendLedger>> {
        self.spend_ledger.as_ref()
    }

    /// How quota leases are granted ([`Leasing`]; a fraction of 0 grants none).
    pub fn leasing(mut self, leasing: Leasing) -> Limiter {
        self.leasing = leasing;
        self
    }

    /// Posts the alerts reports raise to `webhook` (without one they are counted, logged and
    /// shown on the console only).
    pub fn alerting(mut self, webhook: Option<Webhook>) -> Limiter {
        self.alerts = Alerts::new(webhook, self.metrics.alert_deliveries.clone());
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn insights(&self) -> &Insights {
        &self.insights
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// When a request is planned (the calendar period that holds): the store's time. The
    /// memory store counts on this very time; Redis on its own `TIME`, which the last answer
    /// showed (and a script that finds another period asks for a new plan, see
    /// [`StoreError::Replan`]).
    fn planning_now(&self) -> i64 {
        if self.counts_on_redis_time() {
            self.clock.now_ms().saturating_add(
                self.redis_offset_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        } else {
            self.clock.now_ms()
        }
    }

    /// Whether the store keeps its own time (Redis `TIME`) rather than the limiter's clock.
    fn counts_on_redis_time(&self) -> bool {
        self.clock.for_store().is_none() && matches!(self.store, Store::Redis(_))
    }

    /// The time handed to the store with a plan made at `planned`: the memory store counts on
    /// the same instant; Redis on its own clock (`None`) unless the clock is manual.
    fn store_now(&self, planned: i64) -> Option<i64> {
        match (self.clock.for_store(), &self.store) {
            (None, Store::Memory(_)) => Some(planned),
            (now, _) => now,
        }
    }

    /// Remembers Redis's time as an answer showed it.
    fn saw_store_time(&self, store_ms: i64) {
        if self.counts_on_redis_time() {
            let offset = store_ms - self.clock.now_ms();
            self.redis_offset_ms
                .store(offset, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The counters a descriptor spends; `None` when it is not limited (a service-owned limit
    /// no rule matches). A calendar rate is planned for the period that holds now; a zone the
    /// service does not know refuses the request.
    fn plan(&self, d: &Descriptor, now: i64) -> Result<Option<Plan>, BadRequest> {
        let money: Money = match d.currency.as_deref().map(str::as_bytes) {
            Some(&[a, b, c]) => Some([a, b, c]),
            _ => None,
        };
        let meters = if d.rates.is_empty() {
            match self.rules.meter_for(&d.value) {
                Some(m) => vec![m],
                None => return Ok(None),
            }
        } else {
            d.rates
                .iter()
                .map(|r| match &r.calendar {
                    None => Ok(Meter::Window {
                        budget: r.budget as i64,
                        window_ms: r.window_s as i64 * 1000,
                        sliding: self.sliding,
                        money,
                    }),
                    Some(c) => {
                        let tz = calendar::zone(&c.timezone).map_err(|e| BadRequest(e.0))?;
                        let (start_ms, end_ms) =
                            calendar::bounds(c.period, &tz, now).map_err(|e| BadRequest(e.0))?;
                        Ok(Meter::Calendar {
                            budget: r.budget as i64,
                            start_ms,
                            end_ms,
                            zone: calendar::zone_id(c.period, &c.timezone),
                            money,
                        })
                    }
                })
                .collect::<Result<_, BadRequest>>()?
        };
        Ok(Some(Plan {
            id: CounterId {
                limit: d.limit.clone(),
                value: d.value.clone(),
                shared: d.shared,
            },
            meters,
            // Only a limit with its own rates may be a shadow one: the rules' limits decide.
            shadow: d.shadow && !d.rates.is_empty(),
            // Alerts are fractions of a budget the descriptor states.
            alerts: if d.rates.is_empty() {
                Vec::new()
            } else {
                let mut alerts = d.alerts.clone();
                alerts.sort();
                alerts.dedup();
                alerts
            },
        }))
    }

    /// The plans of a request's descriptors, each beside the descriptor it came from.
    fn plans<'d>(
        &self,
        ds: &'d [Descriptor],
        now: i64,
    ) -> Result<Vec<(&'d Descriptor, Plan)>, BadRequest> {
        let mut plans = Vec::with_capacity(ds.len());
        for d in ds {
            if let Some(p) = self.plan(d, now)? {
                plans.push((d, p));
            }
        }
        Ok(plans)
    }

    pub(crate) fn store_failed(&self, e: StoreError) -> Failure {
        inc(&self.metrics.store_errors);
        tracing::warn!("{e}");
        Failure::Store(e)
    }

    pub async fn check(&self, req: &CheckRequest) -> Result<CheckResponse, Failure> {
        let started = Instant::now();
        validate_check(req).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let reserve = req.reserve;
        let mut planned_at = self.planning_now();
        let mut retried = false;
        let (planned, plans, now, outcome) = loop {
            let planned = self
                .plans(&req.descriptors, planned_at)
                .inspect_err(|_| inc(&self.metrics.bad_requests))?;
            let plans: Vec<Plan> = planned.iter().map(|(_, p)| p.clone()).collect();
            let now = self.store_now(planned_at);
            self.restore_calendars(&plans, planned_at).await;
            match self.store.check(&plans, reserve, req.trim, now).await {
                Ok(o) => {
                    self.saw_store_time(o.at_ms);
                    break (planned, plans, now, o);
                }
                // Redis's clock is in another calendar period: plan once more at its time.
                Err(StoreError::Replan(at)) if !retried => {
                    self.saw_store_time(at);
                    planned_at = at;
                    retried = true;
                }
                Err(e) => {
                    inc(&self.metrics.checks_failed);
                    return Err(self.store_failed(e));
                }
            }
        };
        // What was taken: the reserve, or a trimmed check's grant.
        let taken = outcome.granted.unwrap_or(reserve);
        let reserves = !taken.is_zero();
        let mut reserved_at_ms = (outcome.allowed && reserves).then_some(outcome.at_ms as u64);
        if let (Some(_), Some(id)) = (reserved_at_ms, req.id.as_deref().and_then(SeqId::parse)) {
            if !self
                .record_reservation(id, &plans, taken, outcome.at_ms, now)
                .await
            {
                reserved_at_ms = None;
            }
        }
        let mut limits = Vec::new();
        let mut worst: Option<(i64, &str)> = None;
        for ((d, plan), statuses) in planned.iter().zip(&outcome.statuses) {
            // Shadow limits never decide: their figures would read as this request's limits.
            if plan.shadow {
                continue;
            }
            for (j, (meter, st)) in plan.meters.iter().zip(statuses).enumerate() {
                let calendar = d.rates.get(j).and_then(|r| r.calendar.as_ref());
                limits.push(limit_status(&plan.id, meter, st, calendar));
                if !outcome.allowed && st.retry_ms > worst.map_or(0, |w| w.0) {
                    worst = Some((st.retry_ms, plan.id.limit.as_str()));
                }
            }
        }
        // Shadow denials are of admitted checks only (a denied one was refused anyway).
        let mut shadow_denied: Vec<String> = Vec::new();
        if outcome.allowed {
            for ((d, _), _) in planned
                .iter()
                .zip(&outcome.shadow_denied)
                .filter(|(_, denied)| **denied)
            {
                if !shadow_denied.contains(&d.limit) {
                    shadow_denied.push(d.limit.clone());
                }
            }
        }
        if !shadow_denied.is_empty() {
            self.record_shadow_denials(&planned, &outcome, taken, &shadow_denied);
        }
        if outcome.allowed {
            inc(&self.metrics.checks_allowed);
            if outcome.granted.is_some() {
                inc(&self.metrics.checks_trimmed);
            }
            if reserved_at_ms.is_some() {
                self.metrics.charged(taken.tokens as i64);
                self.spent(&planned, taken.micros as i64);
                let mut tally = Tally::default();
                tally.charge(
                    planned.iter().map(|(d, _)| *d),
                    taken.tokens as i64,
                    taken.micros as i64,
                );
                self.record(tally);
            }
        } else {
            inc(&self.metrics.checks_denied);
            self.record_denial(&planned, &outcome.statuses, reserve);
        }
        let lease = match &req.lease {
            Some(ask) if outcome.allowed => {
                Some(self.lease(ask, &planned, &plans, &outcome, now).await)
            }
            _ => None,
        };
        self.metrics.observe_check(started.elapsed());
        Ok(CheckResponse {
            lease,
            allowed: outcome.allowed,
            limits,
            retry_after_ms: worst.map_or(0, |w| w.0 as u64),
            denied_by: worst.map(|w| w.1.to_string()),
            reserved_at_ms,
            granted: outcome.granted.filter(|_| reserved_at_ms.is_some()),
            shadow_denied,
        })
    }

    /// Takes the lease an admitted check asked for, whole, if the counters are far enough
    /// from their limits ([`Leasing::offer`]); the answer says how much there was room for
    /// either way. Taken like a reservation (atomically on every counter) and recorded under
    /// the ask's id, so a release of a lease whose answer was lost gives it back.
    async fn lease(
        &self,
        ask: &LeaseAsk,
        planned: &[(&Descriptor, Plan)],
        plans: &[Plan],
        outcome: &CheckOutcome,
        now: Option<i64>,
    ) -> LeaseAnswer {
        let declined = |answer: LeaseAnswer| {
            inc(&self.metrics.leases_declined);
            answer
        };
        let (leasing, at) = (&self.leasing, outcome.at_ms);
        let (offer, booked) = self
            .leased
            .book(leasing, plans, &outcome.statuses, at, ask.amount);
        let Some(offer) = offer else {
            return declined(LeaseAnswer::default());
        };
        let mut answer = LeaseAnswer {
            room: offer.room,
            ttl_ms: offer.ttl_ms as u64,
            ..LeaseAnswer::default()
        };
        if !booked {
            return declined(answer);
        }
        let taken = match self.store.check(plans, ask.amount, None, now).await {
            Ok(taken) if taken.allowed => taken,
            other => {
                if let Err(e) = other {
                    tracing::warn!("could not take a lease: {e}");
                }
                self.leased.unbook(leasing, plans, at, ask.amount);
                return declined(answer);
            }
        };
        // Counted from the ask's arrival: the plugin counts from when it sent it, earlier. Too
        // little left of the window once taken (the store's clock moved on): given back.
        let ttl_ms = offer.ttl_ms - (taken.at_ms - outcome.at_ms).max(0);
        if ttl_ms < lease::MIN_TTL_MS {
            let undo = Settlement {
                excess: Amount::ZERO,
                refund: ask.amount,
                refund_at: Some(taken.at_ms),
            };
            if let Err(e) = self.store.settle(None, plans, &undo, now).await {
                tracing::warn!("could not give back a lease taken too late: {e}");
            }
            self.leased.unbook(leasing, plans, at, ask.amount);
            return declined(answer);
        }
        let recorded = match SeqId::parse(&ask.id) {
            Some(id) => {
                self.record_reservation(id, plans, ask.amount, taken.at_ms, now)
                    .await
            }
            None => true,
        };
        if !recorded {
            self.leased.unbook(leasing, plans, at, ask.amount);
            return declined(answer);
        }
        inc(&self.metrics.leases_granted);
        // Charged as a check's reservation is: reports settle it net.
        let (tokens, micros) = (ask.amount.tokens as i64, ask.amount.micros as i64);
        self.metrics.charged(tokens);
        self.spent(planned, micros);
        let mut tally = Tally::default();
        tally.charge(planned.iter().map(|(d, _)| *d), tokens, micros);
        self.record(tally);
        answer.granted = Some(ask.amount);
        answer.reserved_at_ms = taken.at_ms.max(0) as u64;
        answer.ttl_ms = ttl_ms as u64;
        answer
    }

    /// Records that check `id` took `taken` (at `at_ms`), so that a release finds it. `false`
    /// when its release came first: nobody will use nor settle it, so it is given back now.
    /// A reservation the store could not record stands (a release would not give it back).
    async fn record_reservation(
        &self,
        id: SeqId,
        plans: &[Plan],
        taken: Amount,
        at_ms: i64,
        now: Option<i64>,
    ) -> bool {
        match self.store.mark_reserved(id).await {
            Ok(Mark::Recorded) => true,
            Ok(Mark::Unknown) => {
                inc(&self.metrics.reservations_unrecorded);
                true
            }
            Ok(Mark::Released) => {
                let undo = Settlement {
                    excess: Amount::ZERO,
                    refund: taken,
                    refund_at: Some(at_ms),
                };
                if let Err(e) = self.store.settle(None, plans, &undo, now).await {
                    tracing::warn!("could not undo a released reservation: {e}");
                }
                false
            }
            Err(e) => {
                inc(&self.metrics.reservations_unrecorded);
                tracing::warn!("could not record a reservation: {e}");
                true
            }
        }
    }

    /// Shadow limits that would have denied: counted per limit, logged, and shown apart on
    /// the console.
    fn record_shadow_denials(
        &self,
        planned: &[(&Descriptor, Plan)],
        outcome: &CheckOutcome,
        reserve: Amount,
        limits: &[String],
    ) {
        // Counted once per limit and check, as the plugin counts it.
        for limit in limits {
            self.metrics.shadow_denied(limit);
        }
        let denied = planned
            .iter()
            .zip(&outcome.statuses)
            .zip(&outcome.shadow_denied)
            .filter(|(_, denied)| **denied)
            .map(|(pair, _)| pair);
        for ((d, plan), statuses) in denied {
            // Debug formatting: a key value cannot forge a log line.
            tracing::info!(
                limit = ?d.limit,
                value = ?board::bounded(&d.value),
                "shadow limit would have denied"
            );
            if let Some(denial) = self.denial(d, plan, statuses, reserve) {
                self.insights.record(ConsoleEvent::Denied(Denial {
                    shadow: true,
                    ..denial
                }));
            }
        }
    }

    /// Applies a batch of reports, each on its own: a malformed one is rejected alone; after a
    /// store failure the rest are left for a retry (with their ids, so nothing is charged
    /// twice). Only a batch whose first report meets a store failure fails as a whole (503).
    pub async fn report(&self, req: &ReportRequest) -> Result<ReportResponse, Failure> {
        validate_reports(req).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let mut answer = ReportResponse::default();
        let mut store_down = None;
        let mut tally = Tally::default();
        let mut raising = Raising::default();
        for (i, r) in req.reports.iter().enumerate() {
            if store_down.is_some() {
                answer.results.push(ReportResult::of(Outcome::Retry));
                continue;
            }
            if let Err(BadRequest(why)) = validate_report(r, &format!("reports[{i}].")) {
                inc(&self.metrics.reports_rejected);
                tracing::warn!("report refused: {why}");
                answer.results.push(ReportResult::rejected(why));
                continue;
            }
            let planned_at = self.planning_now();
            let planned = match self.plans(&r.descriptors, planned_at) {
                Ok(p) => p,
                Err(BadRequest(why)) => {
                    inc(&self.metrics.reports_rejected);
                    tracing::warn!("report refused: reports[{i}]: {why}");
                    answer.results.push(ReportResult::rejected(why));
                    continue;
                }
            };
            let id = SeqId::parse(&r.id);
            let mut crossings = Vec::new();
            let applied = match self.reserved(r).await {
                Ok(settlement) => self
                    .settle_planned(
                        id,
                        &r.descriptors,
                        &planned,
                        &settlement,
                        planned_at,
                        &mut crossings,
                    )
                    .await
                    .map(|a| (a, settlement)),
                Err(e) => Err(e),
            };
            // Raised whatever became of the report: a counter that settled keeps its marks.
            self.raise(&planned, &crossings, &mut raising);
            let result = match applied {
                Ok((Applied::Yes, settlement)) => {
                    inc(&self.metrics.reports_accepted);
                    let (tokens, micros) = settlement.net();
                    self.metrics.charged(tokens);
                    self.spent(&planned, micros);
                    tally.charge(planned.iter().map(|(d, _)| *d), tokens, micros);
                    self.ledger_entry(r, &planned);
                    answer.accepted += 1;
                    ReportResult::of(Outcome::Applied)
                }
                Ok((Applied::Duplicate, _)) => {
                    inc(&self.metrics.reports_duplicate);
                    // The store may have applied it on a try whose answer was lost: the
                    // ledger, which counts each id once, hears of it now.
                    self.ledger_entry(r, &planned);
                    answer.duplicates += 1;
                    ReportResult::of(Outcome::Duplicate)
                }
                Ok((Applied::Stale, _)) => {
                    inc(&self.metrics.reports_rejected);
                    let why = format!(
                        "reports[{i}].id is older than the last {} ids of its source",
                        wire::REPORT_WINDOW
                    );
                    tracing::warn!("report refused: {why}");
                    ReportResult::rejected(why)
                }
                Err(e) => {
                    inc(&self.metrics.reports_failed);
                    store_down = Some(e);
                    ReportResult::of(Outcome::Retry)
                }
            };
            answer.results.push(result);
        }
        self.record(tally);
        if raising.suppressed > 0 {
            tracing::warn!(
                "{} alerts of one report batch not raised: past {MAX_ALERTS_PER_BATCH} a batch",
                raising.suppressed
            );
        }
        match store_down {
            Some(e) if answer.results.first() == Some(&ReportResult::of(Outcome::Retry)) => {
                Err(self.store_failed(e))
            }
            Some(e) => {
                self.store_failed(e);
                Ok(answer)
            }
            None => Ok(answer),
        }
    }

    /// Settles `planned`; when Redis's clock is in another calendar period than the plan's, plans
    /// once more at its time (the groups already settled count the retry as a duplicate).
    async fn settle_planned(
        &self,
        id: Option<SeqId>,
        ds: &[Descriptor],
        planned: &[(&Descriptor, Plan)],
        settlement: &Settlement,
        planned_at: i64,
        raised: &mut Vec<Crossing>,
    ) -> Result<Applied, StoreError> {
        let plans: Vec<Plan> = planned.iter().map(|(_, p)| p.clone()).collect();
        let now = self.store_now(planned_at);
        match self
            .store
            .settle_report(id, &plans, settlement, now, Some(&mut *raised))
            .await
        {
            // Only a report with an id is settled again: the groups that settled the first
            // time know it and count the retry as a duplicate.
            Err(StoreError::Replan(at)) if id.is_some() => {
                self.saw_store_time(at);
                let again = self
                    .plans(ds, at)
                    .map_err(|BadRequest(why)| StoreError::Unavailable(why))?;
                let plans: Vec<Plan> = again.into_iter().map(|(_, p)| p).collect();
                self.store
                    .settle_report(id, &plans, settlement, now, Some(raised))
                    .await
            }
            other => other,
        }
    }

    /// What a report settles. A release counts its reservation only if the store recorded
    /// it and this is the first release; it settles as a refund does, in the window the
    /// reservation was taken in (`reserved_at_ms`; the current one when not given).
    async fn reserved(&self, r: &Report) -> Result<Settlement, StoreError> {
        let at = r.reserved_at_ms.map(|t| t.min(i64::MAX as u64) as i64);
        let Some(check) = &r.release else {
            return Ok(Settlement::of(r.used, r.reserved, at));
        };
        let taken = match SeqId::parse(check) {
            Some(id) => self.store.release(id).await?,
            None => false,
        };
        inc(if taken {
            &self.metrics.reservations_released
        } else {
            &self.metrics.releases_without_reservation
        });
        Ok(Settlement::of(
            r.used,
            if taken { r.reserved } else { Amount::ZERO },
            at,
        ))
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
                    shadow: false,
                    alerts: Vec::new(),
                })
            })
            .collect()
    }

    /// ASM `GET /ratelimit`: one token must be left in every key's bucket.
    pub async fn asm_check(&self, keys: &[String]) -> Result<AsmCheckResponse, Failure> {
        let started = Instant::now();
        validate_asm_keys(keys).inspect_err(|_| inc(&self.metrics.bad_requests))?;
        let plans = self.asm_plans(keys);
        let outcome = match self
            .store
            .check(&plans, Amount::ZERO, None, self.clock.for_store())
            .await
        {
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
        let plans = self.asm_plans(&u.ratelimit_keys);
        let charge = Settlement {
            excess: Amount::tokens(tokens),
            ..Settlement::default()
        };
        match self
            .store
            .settle(None, &plans, &charge, self.clock.for_store())
            .await
        {
            Ok(_) => {
                inc(&self.metrics.reports_accepted);
                self.metrics.charged(charge.net().0);
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
            shadow: false,
            alerts: Vec::new(),
        };
        let meters = self
            .store
            .peek(&plan, self.clock.for_store(), self.sliding)
            .await
            .map_err(|e| self.store_failed(e))?;
        Ok(meters
            .iter()
            .map(|(m, st)| limit_status(&id, m, st, None))
            .collect())
    }

    /// Raises the alerts a report's settlement reached: counted, logged, on the console, and
    /// queued for the webhook; never waits.
    fn raise(
        &self,
        planned: &[(&Descriptor, Plan)],
        crossings: &[Crossing],
        raising: &mut Raising,
    ) {
        let now_ms = self.clock.now_ms();
        for c in crossings {
            let Some(((d, plan), meter)) = planned
                .get(c.plan)
                .and_then(|p| Some((p, p.1.meters.get(c.meter)?)))
            else {
                continue;
            };
            let field = meter.field();
            for threshold in &c.thresholds {
                // One descriptor named twice in a request is one counter: one alert.
                let once = (plan.id.clone(), field.clone(), c.window.0, *threshold);
                if raising.seen.contains(&once) {
                    continue;
                }
                // Past the cap nothing more is kept: the set stays bounded too.
                if raising.seen.len() >= MAX_ALERTS_PER_BATCH {
                    raising.suppressed += 1;
                    inc(&self.metrics.alerts_suppressed);
                    continue;
                }
                raising.seen.insert(once);
                let raised = Raised {
                    limit: &d.limit,
                    key: &d.value,
                    shared: plan.id.shared,
                    meter: &field,
                    threshold: *threshold,
                    used: c.used,
                    budget: c.budget,
                    currency: d.currency.as_deref().filter(|_| meter.money().is_some()),
                    window: c.window,
                    now_ms,
                };
                let alert = raised.alert();
                self.metrics
                    .alerted(&d.limit, &threshold.fraction().to_string());
                // Debug formatting: a key value cannot forge a log line.
                tracing::info!(
                    limit = ?d.limit,
                    value = ?board::bounded(&d.value),
                    threshold = threshold.fraction(),
                    used = c.used,
                    budget = c.budget,
                    "alert threshold reached"
                );
                self.insights.record(ConsoleEvent::Alerted(alert.note()));
                self.alerts.send(alert);
            }
        }
    }

    /// Hands the console what a check or a batch of reports did; never waits on it.
    fn record(&self, tally: Tally) {
        if let Some(event) = tally.event(self.clock.now_ms()) {
            self.insights.record(event);
        }
    }

    /// Keeps a denied check for the console: the limit that denied, its key, and why.
    fn record_denial(
        &self,
        planned: &[(&Descriptor, Plan)],
        statuses: &[Vec<Status>],
        reserve: Amount,
    ) {
        let denial = planned
            .iter()
            .zip(statuses)
            .filter(|((_, plan), _)| !plan.shadow)
            .find_map(|((d, plan), st)| self.denial(d, plan, st, reserve));
        if let Some(denial) = denial {
            self.insights.record(ConsoleEvent::Denied(denial));
        }
    }

    /// How counter `plan` denied a check for `reserve`, in words; `None` when it did not.
    fn denial(
        &self,
        d: &Descriptor,
        plan: &Plan,
        statuses: &[Status],
        reserve: Amount,
    ) -> Option<Denial> {
        let (meter, status) = plan
            .meters
            .iter()
            .zip(statuses)
            // A shadow limit's counter was charged all the same: its most pressing meter.
            .filter(|(_, s)| plan.shadow || s.retry_ms > 0)
            .max_by_key(|(_, s)| s.retry_ms)?;
        let need = counted(reserve, meter.money()).max(1);
        let amount = |n: i64| match meter.money() {
            Some(c) => format!(
                "{} {}",
                wire::format_micros(n.max(0) as u64),
                String::from_utf8_lossy(&c)
            ),
            None => format!("{n} tokens"),
        };
        Some(Denial {
            at_ms: self.clock.now_ms(),
            limit: d.limit.clone(),
            value: board::bounded(&d.value).to_string(),
            reason: format!(
                "{} left of {}, {} needed; retry in {} s",
                amount(status.remaining),
                amount(status.limit),
                amount(need),
                (status.retry_ms.max(0) + 999) / 1000
            ),
            shadow: false,
        })
    }

    /// The admin API: `amount` more for the counter's current windows, or (`None`) a reset.
    /// Returns the meters changed.
    pub async fn adjust(
        &self,
        limit: &str,
        value: &str,
        shared: bool,
        grant: Option<u64>,
    ) -> Result<usize, Failure> {
        let plan = Plan {
            id: CounterId {
                limit: limit.to_string(),
                value: value.to_string(),
                shared,
            },
            meters: Vec::new(),
            shadow: false,
            alerts: Vec::new(),
        };
        let grant = grant.map(|g| g.min(MAX_AMOUNT) as i64);
        self.store
            .adjust(&plan, grant, self.clock.for_store())
            .await
            .map_err(|e| self.store_failed(e))
    }

    /// Counts money spent (or, negative, given back) per limit that counts it.
    /// Gives calendar counters that show nothing spent in their period what the ledger says
    /// was (see [`crate::ledger::restore`]); a failure leaves the counter as it is, to be
    /// looked at again by the next check.
    async fn restore_calendars(&self, plans: &[Plan], now_ms: i64) {
        let Some(ledger) = &self.spend_ledger else {
            return;
        };
        let calendar = |m: &Meter| matches!(m, Meter::Calendar { .. });
        if !plans.iter().any(|p| p.meters.iter().any(calendar)) {
            return;
        }
        // How often to look is wall time (a test's manual clock may stand still).
        let wall = crate::clock::system_ms();
        if self.restored.paused(wall) {
            return;
        }
        if self.restored.epoch_due(wall) {
            match self.store.epoch().await {
                Ok(epoch) => self.restored.saw_epoch(epoch, wall),
                Err(_) => return,
            }
        }
        for plan in plans {
            for meter in plan.meters.iter().filter(|m| calendar(m)) {
                let Meter::Calendar { start_ms, .. } = *meter else {
                    continue;
                };
                let (key, field) = (plan.id.storage_key(), meter.field());
                if !self.restored.due(&key, &field, start_ms, wall) {
                    continue;
                }
                match self.restore(ledger, plan, meter, now_ms).await {
                    Ok(()) => self.restored.looked_at(&key, &field, start_ms, wall),
                    Err(e) => {
                        // Checks go on without restoring for a while rather than each waiting.
                        self.restored.pause(wall);
                        tracing::warn!("calendar counter not restored from the ledger: {e}; restoring pauses for {} s", crate::ledger::restore::PAUSE_MS / 1000);
                        return;
                    }
                }
            }
        }
    }

    async fn restore(
        &self,
        ledger: &SpendLedger,
        plan: &Plan,
        meter: &Meter,
        now_ms: i64,
    ) -> Result<(), String> {
        let Meter::Calendar {
            start_ms, end_ms, ..
        } = *meter
        else {
            return Ok(());
        };
        let id = &plan.id;
        let (key, field) = (id.storage_key(), meter.field());
        // The marker lives beside the counter and is lost with it: present, this store's life
        // knows the counter's period already.
        if self
            .store
            .restore_marked(&key, &field, start_ms)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let spent = ledger
            .spent_since(&id.limit, &id.value, id.shared, start_ms)
            .await
            .map_err(|e| e.to_string())?;
        if !self
            .store
            .claim_restore(&key, &field, start_ms, end_ms.saturating_sub(now_ms))
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let alone = Plan {
            id: id.clone(),
            meters: vec![*meter],
            shadow: plan.shadow,
            alerts: Vec::new(),
        };
        let store_now = self.store_now(now_ms);
        // What the store counts already (reports applied since it lost the counter are in
        // both): only the rest is added.
        let stored = self
            .store
            .peek(&alone, store_now, self.sliding)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .find(|(m, _)| m.field() == field)
            .map_or(0, |(_, st)| st.limit - st.remaining);
        let ledger_says = match meter.money() {
            Some(_) => spent.cost_micros,
            None => spent.tokens,
        };
        let missing = ledger_says.saturating_sub(stored).max(0) as u64;
        if missing == 0 {
            return Ok(());
        }
        let excess = match meter.money() {
            Some(_) => Amount::new(0, missing),
            None => Amount::new(missing, 0),
        };
        let settlement = Settlement {
            excess,
            refund: Amount::ZERO,
            refund_at: None,
        };
        if let Err(e) = self
            .store
            .settle(None, &[alone], &settlement, store_now)
            .await
        {
            // Not restored: the marker goes, so that the next look restores it.
            let _ = self.store.unclaim_restore(&key, &field, start_ms).await;
            return Err(e.to_string());
        }
        inc(&self.metrics.ledger_restored);
        tracing::warn!(
            limit = ?id.limit,
            value = ?board::bounded(&id.value),
            missing,
            "calendar counter restored from the ledger (its store had lost it)"
        );
        Ok(())
    }

    /// Hands what an applied report's requests spent to the ledger: a row per counter it
    /// charged, in the quarter hour it was applied (the service's clock). Cost goes only to
    /// limits in money (their currency's micro units).
    fn ledger_entry(&self, r: &Report, planned: &[(&Descriptor, Plan)]) {
        let Some(ledger) = &self.spend_ledger else {
            return;
        };
        let bucket_ms = crate::ledger::bucket(self.clock.now_ms());
        let amount = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let rows = r
            .spend
            .iter()
            .flat_map(|spend| planned.iter().map(move |p| (spend, p)))
            .map(|(spend, (d, plan))| {
                let key = RowKey {
                    limit: storable(&plan.id.limit),
                    value: storable(&plan.id.value),
                    shared: plan.id.shared,
                    model: storable(spend.model.as_deref().unwrap_or_default()),
                    currency: storable(d.currency.as_deref().unwrap_or_default()),
                    bucket_ms,
                };
                let sums = Sums {
                    requests: amount(spend.requests),
                    tokens: amount(spend.used.tokens),
                    cost_micros: if d.currency.is_some() {
                        amount(spend.used.micros)
                    } else {
                        0
                    },
                };
                (key, sums)
            })
            .collect();
        ledger.record(Entry {
            id: r.id.clone(),
            rows,
        });
    }

    fn spent(&self, planned: &[(&Descriptor, Plan)], micros: i64) {
        if micros == 0 {
            return;
        }
        for (d, _) in planned {
            if let Some(currency) = &d.currency {
                self.metrics.spent(&d.limit, currency, micros);
            }
        }
    }
}

/// The most alerts one report batch raises: any caller that may report chooses its
/// descriptors' thresholds, and one batch could otherwise raise thousands.
pub const MAX_ALERTS_PER_BATCH: usize = 256;

/// The alerts one report batch has raised so far.
#[derive(Default)]
struct Raising {
    seen: std::collections::HashSet<(crate::counter::CounterId, String, i64, wire::Threshold)>,
    suppressed: u64,
}

/// One meter's state as the wire states it; a calendar rate also says when its period ends, in
/// its zone (`calendar`: the rate as the check gave it; `/v1/quota` knows only the stored state).
fn limit_status(
    id: &CounterId,
    meter: &Meter,
    st: &Status,
    calendar: Option<&wire::Calendar>,
) -> LimitStatus {
    let window_ms = match *meter {
        Meter::Window { window_ms, .. } => window_ms,
        Meter::Calendar {
            start_ms, end_ms, ..
        } => end_ms - start_ms,
        Meter::Bucket { interval_ms, .. } => interval_ms,
    };
    let resets_at = match (meter, calendar) {
        (Meter::Calendar { end_ms, .. }, Some(c)) => calendar::zone(&c.timezone)
            .ok()
            .map(|tz| calendar::rfc3339(*end_ms, &tz)),
        _ => None,
    };
    LimitStatus {
        limit: id.limit.clone(),
        value: id.value.clone(),
        budget: st.limit.max(0) as u64,
        window_s: (window_ms / 1000).max(0) as u64,
        remaining: st.remaining.max(0) as u64,
        reset_ms: st.reset_ms.max(0) as u64,
        currency: meter
            .money()
            .map(|c| String::from_utf8_lossy(&c).into_owned()),
        period: calendar.map(|c| c.period),
        resets_at,
    }
}
