//! Where counters live. Both stores run the same algorithm ([`crate::meter`]) and pass the
//! same behavioural test suite: memory in-process, Redis through one Lua script.

pub mod memory;
pub mod redis;
pub mod sources;

use thiserror::Error;

use crate::counter::Plan;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::insights::{Denial, Minute, Ranking};
use crate::meter::{unit, Meter, State, Status};
use sources::Mark;
use wire::SeqId;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's clock (Redis `TIME`, in ms) is in another calendar period than the one the
    /// request was planned for: plan again at that time. Nothing was written.
    #[error("the store's clock is in another calendar period")]
    Replan(i64),
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// Its id was applied before: nothing done.
    Duplicate,
    /// Its id is older than its source's window: cannot be told apart, nothing done.
    Stale,
}

/// A check's result: the decision and every meter's status after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Per plan, per meter, in request order.
    pub statuses: Vec<Vec<Status>>,
    /// The store's time of the decision (ms since the epoch): where a reservation was taken.
    pub at_ms: i64,
}

/// One amount per unit a meter may count, indexed by [`crate::meter::unit`]: tokens, then
/// micro units of money (a meter that counts money is charged the request's cost).
pub type Amounts = [i64; 2];

/// What a report does to its counters once its usage is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Beyond the reservation: charged now, in the current window.
    pub excess: Amounts,
    /// Reserved but not used: given back to the window the reservation was taken in.
    pub refund: Amounts,
    /// When the reservation was taken; `None`: now.
    pub refund_at: Option<i64>,
}

impl Settlement {
    /// A request that used `used` after `reserved` were taken at `reserved_at`.
    pub fn of(used: Amounts, reserved: Amounts, reserved_at: Option<i64>) -> Settlement {
        let part = |f: fn(i64, i64) -> i64| [f(used[0], reserved[0]), f(used[1], reserved[1])];
        Settlement {
            excess: part(|u, r| (u - r).max(0)),
            refund: part(|u, r| (r - u).max(0)),
            refund_at: reserved_at,
        }
    }
}

/// The memory or Redis store; an enum rather than a trait object keeps async calls plain.
pub enum Store {
    Memory(MemoryStore),
    /// Shared with the console's background writes.
    Redis(Arc<RedisStore>),
}

/// What the console is told: what reached the counters, or a denial.
pub enum ConsoleEvent {
    Charged {
        now_ms: i64,
        tokens: i64,
        spend: BTreeMap<String, i64>,
        used: BTreeMap<(String, String), i64>,
    },
    Denied(Denial),
}

impl Store {
    /// Admits iff every meter has `remaining ≥ max(1, reserve)` (capped at its budget; the
    /// reserve of its unit), and then takes the reserve from every meter at once. `now`: a
    /// test's manual clock, or `None` for the store's own clock (Redis's `TIME`, so replicas
    /// never disagree).
    pub async fn check(
        &self,
        plans: &[Plan],
        reserve: Amounts,
        now: Option<i64>,
    ) -> Result<CheckOutcome, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.check(plans, reserve, now)),
            Store::Redis(r) => r.check(plans, reserve, now).await,
        }
    }

    /// Applies a settlement to every meter. With an `id`, only the first time the id is seen
    /// (ids are remembered per source, see [`sources`]).
    pub async fn settle(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
    ) -> Result<Applied, StoreError> {
        if plans.is_empty() && id.is_none() {
            // Nothing is limited (service-owned limits no rule matches): nothing to charge.
            return Ok(Applied::Yes);
        }
        match self {
            Store::Memory(m) => Ok(m.settle(id, plans, settlement, now)),
            Store::Redis(r) => r.settle(id, plans, settlement, now).await,
        }
    }

    /// Records that the check `id` took its reservation; [`Mark::Released`] when a release
    /// for it came first (the reservation must then be given back).
    pub async fn mark_reserved(&self, id: SeqId) -> Result<Mark, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.mark_reserved(id)),
            Store::Redis(r) => r.mark_reserved(id).await,
        }
    }

    /// Releases the reservation of check `id`, once: `true` when it had been taken (and not
    /// released before), so the release may give it back.
    pub async fn release(&self, id: SeqId) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.release(id)),
            Store::Redis(r) => r.release(id).await,
        }
    }

    /// Every meter stored for one counter, read-only (for operators).
    pub async fn peek(
        &self,
        plan: &Plan,
        now: Option<i64>,
        sliding: bool,
    ) -> Result<Vec<(Meter, Status)>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.peek(plan, now, sliding)),
            Store::Redis(r) => r.peek(plan, now, sliding).await,
        }
    }

    /// Tells the console, without waiting: in process for the memory store; for Redis through
    /// a queue that one background writer drains in batches, so no check or report waits on it.
    pub fn record(&self, event: ConsoleEvent) {
        match self {
            Store::Memory(m) => match event {
                ConsoleEvent::Charged {
                    now_ms,
                    tokens,
                    spend,
                    used,
                } => {
                    m.insights.per_minute(now_ms, tokens, &spend);
                    for ((limit, value), amount) in &used {
                        m.insights.used(limit, value, *amount);
                    }
                }
                ConsoleEvent::Denied(d) => m.insights.denied(d),
            },
            Store::Redis(r) => r.record_console(event),
        }
    }

    pub async fn denials(&self) -> Result<Vec<Denial>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.insights.denials()),
            Store::Redis(r) => r.denials().await,
        }
    }

    /// Every limit seen and its `n` heaviest keys: (key, tokens counted, overestimate).
    pub async fn top(&self, n: usize) -> Result<Ranking, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.insights.top(n)),
            Store::Redis(r) => r.top(n).await,
        }
    }

    pub async fn timeline(&self, now_ms: i64) -> Result<Vec<Minute>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.insights.timeline(now_ms)),
            Store::Redis(r) => r.timeline(now_ms).await,
        }
    }

    /// The admin API's grant (`Some(amount)`) or reset (`None`) of one counter.
    pub async fn adjust(
        &self,
        plan: &Plan,
        grant: Option<i64>,
        now: Option<i64>,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.adjust(plan, grant, now)),
            Store::Redis(r) => r.adjust(plan, grant).await,
        }
    }

    /// Whether the store can serve (`/readyz`).
    pub async fn ready(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.ping().await,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }
}

/// The check over loaded states (the memory store's core; `limiter.lua` mirrors it).
pub fn check_states(
    plans: &[Plan],
    states: &mut [Vec<State>],
    reserve: Amounts,
    now: i64,
) -> CheckOutcome {
    let need = |m: &Meter| reserve[unit(m.money())].max(1);
    let mut allowed = true;
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            meter.advance(state, now);
            if meter.status(state, now, need(meter)).retry_ms > 0 {
                allowed = false;
            }
        }
    }
    let statuses = plans
        .iter()
        .zip(states.iter_mut())
        .map(|(plan, states)| {
            plan.meters
                .iter()
                .zip(states.iter_mut())
                .map(|(meter, state)| {
                    let reserve = reserve[unit(meter.money())];
                    if allowed && reserve > 0 {
                        meter.charge(state, reserve);
                    }
                    meter.status(state, now, need(meter))
                })
                .collect()
        })
        .collect();
    CheckOutcome {
        allowed,
        statuses,
        at_ms: now,
    }
}

/// Applies a settlement to loaded states.
pub fn settle_states(plans: &[Plan], states: &mut [Vec<State>], s: &Settlement, now: i64) {
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            let u = unit(meter.money());
            meter.advance(state, now);
            meter.charge(state, s.excess[u]);
            meter.refund(state, s.refund[u], s.refund_at.unwrap_or(now));
        }
    }
}
