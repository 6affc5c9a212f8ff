//! Where counters live. Both stores run the same algorithm ([`crate::meter`]) and pass the
//! same behavioural test suite: memory in-process, Redis through one Lua script.

pub mod memory;
pub mod redis;

use thiserror::Error;

use crate::counter::Plan;
use crate::meter::{Meter, State, Status};

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store full: more than {0} live counters")]
    Full(usize),
}

/// A check's result: the decision and every meter's status after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Per plan, per meter, in request order.
    pub statuses: Vec<Vec<Status>>,
}

/// The memory or Redis store; an enum rather than a trait object keeps async calls plain.
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Admits iff every meter has `remaining ≥ max(1, reserve)` (capped at its budget), and
    /// then takes `reserve` from every meter at once.
    pub async fn check(
        &self,
        plans: &[Plan],
        reserve: i64,
        now: i64,
    ) -> Result<CheckOutcome, StoreError> {
        match self {
            Store::Memory(m) => m.check(plans, reserve, now),
            Store::Redis(r) => r.check(plans, reserve, now).await,
        }
    }

    /// Charges `delta` tokens (negative refunds) to every meter. With an `id`, a second
    /// charge with the same id (within the dedup period) does nothing and returns `false`.
    pub async fn charge(
        &self,
        id: Option<&str>,
        plans: &[Plan],
        delta: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.charge(id, plans, delta, now),
            Store::Redis(r) => r.charge(id, plans, delta, now).await,
        }
    }

    /// Every meter stored for one counter, read-only (for operators).
    pub async fn peek(&self, plan: &Plan, now: i64) -> Result<Vec<(Meter, Status)>, StoreError> {
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
    CheckOutcome { allowed, statuses }
}

/// Applies a charge to loaded states.
pub fn charge_states(plans: &[Plan], states: &mut [Vec<State>], delta: i64, now: i64) {
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            meter.advance(state, now);
            meter.charge(state, delta);
        }
    }
}
