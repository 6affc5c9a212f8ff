//! The in-process store: sharded maps of counters, bounded, swept of expired entries.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use super::reservations::{self, Mark, Ring};
use super::{check_states, settle_states, CheckOutcome, Settlement, StoreError};
use crate::clock::system_ms;
use crate::counter::Plan;
use crate::meter::{Meter, State, Status};
use wire::SeqId;

const SHARDS: usize = 64;

/// Sources (plugin VMs) whose reservations are remembered; past it the least recently used
/// is forgotten (its releases then give nothing back). 16 KiB each.
pub const MAX_SOURCES: usize = 1024;

/// How long a report id is remembered, so a retried report is never charged twice.
pub const DEDUP_MS: i64 = 15 * 60 * 1000;

#[derive(Default)]
struct Entry {
    /// Meter field name → state; a counter rarely has more than two meters.
    meters: Vec<(String, State)>,
    expires_at: i64,
}

#[derive(Default)]
struct Shard {
    counters: HashMap<String, Entry>,
    /// Report id → when it may be forgotten.
    report_ids: HashMap<String, i64>,
}

impl Shard {
    fn sweep(&mut self, now: i64) {
        self.counters.retain(|_, e| e.expires_at > now);
        self.report_ids.retain(|_, until| *until > now);
    }
}

pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    /// Live counters and remembered ids allowed per shard.
    per_shard: usize,
    /// Per source, which of its checks reserved (see [`reservations`]).
    sources: Mutex<HashMap<u64, Ring>>,
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl MemoryStore {
    /// A store holding at most about `max_entries` counters (and as many report ids).
    pub fn new(max_entries: usize) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: max_entries.div_ceil(SHARDS).max(1),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Locks the shards of `keys` in index order (no deadlock between concurrent requests).
    fn lock(&self, keys: &[&str]) -> Vec<(usize, MutexGuard<'_, Shard>)> {
        let mut idx: Vec<usize> = keys.iter().map(|k| shard_of(k)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| {
                (
                    i,
                    self.shards[i]
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                )
            })
            .collect()
    }

    /// Runs `f` over the states of `plans`, then stores them back.
    fn with_states<T>(
        &self,
        plans: &[Plan],
        id: Option<&str>,
        now: i64,
        f: impl FnOnce(&mut [Vec<State>], Option<&mut HashMap<String, i64>>) -> T,
    ) -> Result<T, StoreError> {
        let keys: Vec<String> = plans.iter().map(|p| p.id.storage_key()).collect();
        let mut all: Vec<&str> = keys.iter().map(String::as_str).collect();
        if let Some(id) = id {
            all.push(id);
        }
        let mut guards = self.lock(&all);
        let mut shard = |key: &str| -> usize {
            let i = shard_of(key);
            guards.iter().position(|(g, _)| *g == i).unwrap_or(0)
        };
        let positions: Vec<usize> = keys.iter().map(|k| shard(k)).collect();
        let id_position = id.map(&mut shard);

        // Load (a missing or expired counter starts empty), refusing new ones past the bound.
        let mut states = Vec::with_capacity(plans.len());
        for ((plan, key), pos) in plans.iter().zip(&keys).zip(&positions) {
            let guard = &mut guards[*pos].1;
            let live = guard.counters.get(key).filter(|e| e.expires_at > now);
            if live.is_none() && guard.counters.len() >= self.per_shard {
                guard.sweep(now);
                if guard.counters.len() >= self.per_shard {
                    return Err(StoreError::Full(self.per_shard * SHARDS));
                }
            }
            let entry = guard.counters.get(key).filter(|e| e.expires_at > now);
            states.push(
                plan.meters
                    .iter()
                    .map(|m| {
                        let field = m.field();
                        entry
                            .and_then(|e| e.meters.iter().find(|(f, _)| *f == field))
                            .map_or(State::default(), |(_, s)| *s)
                    })
                    .collect::<Vec<State>>(),
            );
        }

        let ids = match id_position {
            Some(pos) => {
                let shard = &mut guards[pos].1;
                if shard.report_ids.len() >= self.per_shard {
                    shard.sweep(now);
                    if shard.report_ids.len() >= self.per_shard {
                        return Err(StoreError::Full(self.per_shard * SHARDS));
                    }
                }
                Some(&mut shard.report_ids)
            }
            None => None,
        };
        let out = f(&mut states, ids);

        for (((plan, key), pos), states) in plans.iter().zip(&keys).zip(&positions).zip(states) {
            let guard = &mut guards[*pos].1;
            let entry = guard.counters.entry(key.clone()).or_default();
            if entry.expires_at <= now {
                *entry = Entry::default();
            }
            for (meter, state) in plan.meters.iter().zip(states) {
                let field = meter.field();
                match entry.meters.iter_mut().find(|(f, _)| *f == field) {
                    Some((_, s)) => *s = state,
                    None => entry.meters.push((field, state)),
                }
                entry.expires_at = entry.expires_at.max(now + meter.ttl_ms());
            }
        }
        Ok(out)
    }

    pub fn check(
        &self,
        plans: &[Plan],
        reserve: i64,
        now: Option<i64>,
    ) -> Result<CheckOutcome, StoreError> {
        let now = now.unwrap_or_else(system_ms);
        self.with_states(plans, None, now, |states, _| {
            check_states(plans, states, reserve, now)
        })
    }

    pub fn settle(
        &self,
        id: Option<&str>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
    ) -> Result<bool, StoreError> {
        let now = now.unwrap_or_else(system_ms);
        self.with_states(plans, id, now, |states, ids| {
            if let (Some(ids), Some(id)) = (ids, id) {
                match ids.get(id) {
                    Some(until) if *until > now => return false,
                    _ => {
                        ids.insert(id.to_string(), now + DEDUP_MS);
                    }
                }
            }
            settle_states(plans, states, settlement, now);
            true
        })
    }

    /// Runs `f` on the ring of `source`, making room for it if needed.
    fn with_ring<T>(&self, source: u64, f: impl FnOnce(&mut Ring) -> T) -> T {
        let now = system_ms();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            sources.retain(|_, r| r.touched + reservations::TTL_MS > now);
            if sources.len() >= MAX_SOURCES {
                if let Some(oldest) = sources
                    .iter()
                    .min_by_key(|(_, r)| r.touched)
                    .map(|(k, _)| *k)
                {
                    sources.remove(&oldest);
                }
            }
        }
        let ring = sources.entry(source).or_default();
        ring.touched = now;
        f(ring)
    }

    pub fn mark_reserved(&self, id: SeqId) -> Mark {
        self.with_ring(id.source, |r| r.mark(id.seq))
    }

    pub fn release(&self, id: SeqId) -> bool {
        self.with_ring(id.source, |r| r.release(id.seq))
    }

    /// Every meter stored under the plan's counter (the plan's own meters are ignored).
    pub fn peek(&self, plan: &Plan, now: Option<i64>) -> Vec<(Meter, Status)> {
        let now = now.unwrap_or_else(system_ms);
        let key = plan.id.storage_key();
        let guards = self.lock(&[&key]);
        let Some((_, shard)) = guards.first() else {
            return Vec::new();
        };
        let Some(entry) = shard.counters.get(&key).filter(|e| e.expires_at > now) else {
            return Vec::new();
        };
        entry
            .meters
            .iter()
            .filter_map(|(field, state)| Meter::inspect(field, *state, now))
            .collect()
    }

    /// Drops expired counters and ids; run periodically so idle keys do not hold memory.
    pub fn sweep(&self, now: i64) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).sweep(now);
        }
        let wall = system_ms();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, r| r.touched + reservations::TTL_MS > wall);
    }

    /// Live counters (for metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).counters.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::CounterId;

    fn plan(value: &str) -> Plan {
        Plan {
            id: CounterId {
                limit: "l".into(),
                value: value.into(),
                shared: false,
            },
            meters: vec![Meter::Window {
                tokens: 10,
                window_ms: 1_000,
                sliding: true,
            }],
        }
    }

    #[test]
    fn bounded_and_swept() {
        let store = MemoryStore::new(SHARDS); // one counter per shard
        let mut full = None;
        for i in 0..10 * SHARDS {
            if let Err(e) = store.check(&[plan(&i.to_string())], 0, Some(0)) {
                full = Some(e);
                break;
            }
        }
        assert!(
            matches!(full, Some(StoreError::Full(_))),
            "the store must refuse past its bound"
        );
        assert!(store.len() <= SHARDS);
        // Once the counters expire (2 windows), their room is reused.
        assert!(store.check(&[plan("later")], 0, Some(2_000)).is_ok());
        store.sweep(10_000);
        assert!(store.is_empty());
    }
}
