//! Where counters live. Both stores run the same algorithm ([`crate::meter`]) and pass the
//! same behavioural test suite: memory in-process, Redis through one Lua script.

pub mod memory;
pub mod redis;
pub mod sources;

use thiserror::Error;

use crate::counter::Plan;
use crate::meter::{Meter, State, Status};
use sources::Mark;
use wire::SeqId;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
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

/// What a report does to its counters once its usage is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Tokens beyond the reservation: charged now, in the current window.
    pub excess: i64,
    /// Reserved tokens not used: given back to the window the reservation was taken in.
    pub refund: i64,
    /// When the reservation was taken; `None`: now.
    pub refund_at: Option<i64>,
}

impl Settlement {
    /// A request that used `tokens` after `reserved` were taken at `reserved_at`.
    pub fn of(tokens: u64, reserved: u64, reserved_at: Option<i64>) -> Settlement {
        let (tokens, reserved) = (tokens as i64, reserved as i64);
        Settlement {
            excess: (tokens - reserved).max(0),
            refund: (reserved - tokens).max(0),
            refund_at: reserved_at,
        }
    }
}

/// The memory or Redis store; an enum rather than a trait object keeps async calls plain.
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Admits iff every meter has `remaining ≥ max(1, reserve)` (capped at its budget), and
    /// then takes `reserve` from every meter at once. `now`: a test's manual clock, or `None`
    /// for the store's own clock (Redis's `TIME`, so replicas never disagree).
    pub async fn check(
        &self,
        plans: &[Plan],
        reserve: i64,
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
    ) -> Result<Vec<(Meter, Status)>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.peek(plan, now)),
            Store::Redis(r) => r.peek(plan, now).await,
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
    reserve: i64,
    now: i64,
) -> CheckOutcome {
    let need = reserve.max(1);
    let mut allowed = true;
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            meter.advance(state, now);
            if meter.status(state, now, need).retry_ms > 0 {
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
                    if allowed && reserve > 0 {
                        meter.charge(state, reserve);
                    }
                    meter.status(state, now, need)
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
            meter.advance(state, now);
            meter.charge(state, s.excess);
            meter.refund(state, s.refund, s.refund_at.unwrap_or(now));
        }
    }
}
