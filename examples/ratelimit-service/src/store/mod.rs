//! Where counters live. Both stores run the same algorithm ([`crate::meter`]) and pass the
//! same behavioural test suite: memory in-process, Redis through one Lua script.

pub mod memory;
mod model;
pub mod redis;
pub mod sources;

use crate::counter::Plan;
use std::sync::Arc;

use crate::meter::{Meter, Status};
use sources::Mark;
use wire::SeqId;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;
pub use model::{
    check_states, settle_states, Applied, CheckOutcome, Crossing, Settlement, StoreError,
};

/// The memory or Redis store; an enum rather than a trait object keeps async calls plain.
pub enum Store {
    Memory(MemoryStore),
    /// Shared with the console's background writes.
    Redis(Arc<RedisStore>),
}

impl Store {
    /// Admits iff every meter has `remaining ≥ max(1, reserve)` (capped at its budget; the
    /// reserve of its unit), and then takes the reserve from every meter at once. `now`: a
    /// test's manual clock, or `None` for the store's own clock (Redis's `TIME`, so replicas
    /// never disagree).
    pub async fn check(
        &self,
        plans: &[Plan],
        reserve: wire::Amount,
        trim: Option<wire::Trim>,
        now: Option<i64>,
    ) -> Result<CheckOutcome, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.check(plans, reserve, trim, now)),
            Store::Redis(r) => r.check(plans, reserve, trim, now).await,
        }
    }

    /// Applies a settlement to every meter. With an `id`, only the first time the id is seen
    /// (ids are remembered per source, see [`sources`]). Raises no alerts (a refund, an undo).
    pub async fn settle(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
    ) -> Result<Applied, StoreError> {
        self.settle_report(id, plans, settlement, now, None).await
    }

    /// [`Store::settle`] for a report: with `raised`, also the alert thresholds it brought
    /// meters to, each raised once per window across replicas (the mark is written in the same
    /// atomic step as the charge). They are added to `raised` even when the settlement fails
    /// as a whole (a Redis Cluster counter that settled keeps its marks, and a retry would be a
    /// duplicate there).
    pub async fn settle_report(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
        raised: Option<&mut Vec<Crossing>>,
    ) -> Result<Applied, StoreError> {
        if plans.is_empty() && id.is_none() {
            // Nothing is limited (service-owned limits no rule matches): nothing to charge.
            return Ok(Applied::Yes);
        }
        let raised = raised.filter(|_| plans.iter().any(|p| !p.alerts.is_empty()));
        match self {
            Store::Memory(m) => {
                let (applied, crossings) = m.settle(id, plans, settlement, now, raised.is_some());
                if let Some(raised) = raised {
                    raised.extend(crossings);
                }
                Ok(applied)
            }
            Store::Redis(r) => r.settle(id, plans, settlement, now, raised).await,
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

    /// The store's epoch: a value Redis keeps until it loses its data (then a new one is
    /// made). `None` for the memory store, whose data lives as long as the process.
    pub async fn epoch(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) => Ok(None),
            Store::Redis(r) => r.epoch().await.map(Some),
        }
    }

    /// Whether this store's life has marked counter `key`'s meter `field` for the period
    /// starting at `start_ms` (the memory store's life is the process's: never).
    pub async fn restore_marked(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(_) => Ok(false),
            Store::Redis(r) => r.restore_marked(key, field, start_ms).await,
        }
    }

    /// Claims the restoring of counter `key`'s meter `field` for the period starting at
    /// `start_ms` (lasting `ttl_ms` more): `true` for one caller per period and store life.
    pub async fn claim_restore(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(_) => Ok(true),
            Store::Redis(r) => r.claim_restore(key, field, start_ms, ttl_ms).await,
        }
    }

    /// Takes back a claim whose restore failed.
    pub async fn unclaim_restore(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.unclaim_restore(key, field, start_ms).await,
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
