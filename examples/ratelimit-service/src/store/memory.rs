//! The in-process store: sharded maps of counters, bounded by evicting the least recently
//! used, swept of expired entries; and, apart from the counters, what it remembers per source
//! (plugin VM): its reservations and its applied reports ([`sources`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use super::model::{
    check_states, settle_states, AlertMark, Applied, CheckOutcome, Crossing, Settlement,
};
use super::sources::{self, Dedup, Mark, SourceLog};
use crate::clock::system_ms;
use crate::counter::Plan;
use crate::meter::{Meter, State, Status};
use wire::SeqId;

const SHARDS: usize = 64;

/// A meter whose alerts raised nothing yet.
const NO_MARK: AlertMark = [i64::MIN, 0];

/// Sources (plugin VMs) remembered; past it the least recently heard of is forgotten (its
/// releases then give nothing back, its retries may be charged again). About 17 KiB each.
pub const MAX_SOURCES: usize = 1024;

#[derive(Default)]
struct Entry {
    /// Meter field name → state, and the budget last applied to it (for read-only lookups);
    /// a counter rarely has more than two meters.
    meters: Vec<(String, State, i64)>,
    /// Meter field name → what its alerts have raised in their window.
    alerted: Vec<(String, AlertMark)>,
    expires_at: i64,
    /// When the counter was last used, for eviction.
    used_at: i64,
}

#[derive(Default)]
struct Shard {
    counters: HashMap<String, Entry>,
}

impl Shard {
    fn sweep(&mut self, now: i64) {
        self.counters.retain(|_, e| e.expires_at > now);
    }

    /// Makes room for one more counter: expired ones go first, then the least recently used
    /// eighth (evicting in bulk keeps a flood of new keys at O(1) per key).
    fn make_room(&mut self, limit: usize, now: i64) -> usize {
        self.sweep(now);
        if self.counters.len() < limit {
            return 0;
        }
        let mut ages: Vec<i64> = self.counters.values().map(|e| e.used_at).collect();
        let cut = (ages.len() / 8).max(1);
        let (_, threshold, _) = ages.select_nth_unstable(cut - 1);
        let threshold = *threshold;
        let before = self.counters.len();
        let mut evicted = 0;
        self.counters.retain(|_, e| {
            let keep = e.used_at > threshold || evicted >= cut;
            if !keep {
                evicted += 1;
            }
            keep
        });
        before - self.counters.len()
    }
}

pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    /// Live counters allowed per shard.
    per_shard: usize,
    sources: Mutex<HashMap<u64, SourceLog>>,
    /// Counters evicted to make room (for metrics).
    evicted: std::sync::atomic::AtomicU64,
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl MemoryStore {
    /// A store holding at most about `max_counters` counters.
    pub fn new(max_counters: usize) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: max_counters.div_ceil(SHARDS).max(1),
            sources: Mutex::new(HashMap::new()),
            evicted: Default::default(),
        }
    }

    /// Grants `amount` more to every meter the counter has now (taken off what each window
    /// has used; a bucket gains it), or resets the counter (`None`); `limiter.lua`'s
    /// `adjust.lua` twin. Returns the meters changed.
    pub fn adjust(&self, plan: &Plan, grant: Option<i64>, now: Option<i64>) -> usize {
        let now = now.unwrap_or_else(system_ms);
        let key = plan.id.storage_key();
        let mut guards = self.lock(&[&key]);
        let Some((_, shard)) = guards.first_mut() else {
            return 0;
        };
        let Some(entry) = shard.counters.get_mut(&key).filter(|e| e.expires_at > now) else {
            return 0;
        };
        match grant {
            None => {
                let n = entry.meters.len();
                shard.counters.remove(&key);
                n
            }
            Some(amount) => {
                for (field, state, _) in &mut entry.meters {
                    if field.starts_with("b:") {
                        state[0] = state[0].saturating_add(amount);
                    } else {
                        state[1] = state[1].saturating_sub(amount);
                    }
                }
                entry.meters.len()
            }
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

    /// Runs `f` over the states of `plans`, then stores them back unless `f` says no. A new
    /// counter in a full shard makes room by eviction: the store never refuses.
    fn with_states<T>(
        &self,
        plans: &[Plan],
        now: i64,
        f: impl FnOnce(&mut [Vec<State>], &mut [Vec<AlertMark>]) -> (T, bool),
    ) -> T {
        let keys: Vec<String> = plans.iter().map(|p| p.id.storage_key()).collect();
        let all: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut guards = self.lock(&all);
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| {
                let i = shard_of(k);
                guards.iter().position(|(g, _)| *g == i).unwrap_or(0)
            })
            .collect();

        // Load: a missing or expired counter starts empty.
        let mut states = Vec::with_capacity(plans.len());
        let mut marks = Vec::with_capacity(plans.len());
        for ((plan, key), pos) in plans.iter().zip(&keys).zip(&positions) {
            let entry = guards[*pos]
                .1
                .counters
                .get(key)
                .filter(|e| e.expires_at > now);
            states.push(
                plan.meters
                    .iter()
                    .map(|m| {
                        let field = m.field();
                        entry
                            .and_then(|e| e.meters.iter().find(|(f, _, _)| *f == field))
                            .map_or(State::default(), |(_, s, _)| *s)
                    })
                    .collect::<Vec<State>>(),
            );
            // Only a plan with alerts has marks.
            marks.push(if plan.alerts.is_empty() {
                Vec::new()
            } else {
                plan.meters
                    .iter()
                    .map(|m| {
                        let field = m.field();
                        entry
                            .and_then(|e| e.alerted.iter().find(|(f, _)| *f == field))
                            .map_or(NO_MARK, |(_, mark)| *mark)
                    })
                    .collect()
            });
        }

        let (out, store) = f(&mut states, &mut marks);
        if !store {
            return out;
        }
        let stored = plans
            .iter()
            .zip(&keys)
            .zip(&positions)
            .zip(states)
            .zip(marks);
        for ((((plan, key), pos), states), marks) in stored {
            let guard = &mut guards[*pos].1;
            if !guard.counters.contains_key(key) && guard.counters.len() >= self.per_shard {
                let n = guard.make_room(self.per_shard, now);
                self.evicted
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let entry = guard.counters.entry(key.clone()).or_default();
            if entry.expires_at <= now {
                *entry = Entry::default();
            }
            entry.used_at = now;
            for (meter, state) in plan.meters.iter().zip(states) {
                let field = meter.field();
                let budget = meter.limit();
                match entry.meters.iter_mut().find(|(f, _, _)| *f == field) {
                    Some((_, s, b)) => (*s, *b) = (state, budget),
                    None => entry.meters.push((field, state, budget)),
                }
                entry.expires_at = entry.expires_at.max(now + meter.ttl_ms());
            }
            for (meter, mark) in plan.meters.iter().zip(marks).filter(|(_, m)| *m != NO_MARK) {
                let field = meter.field();
                match entry.alerted.iter_mut().find(|(f, _)| *f == field) {
                    Some((_, m)) => *m = mark,
                    None => entry.alerted.push((field, mark)),
                }
            }
        }
        out
    }

    pub fn check(
        &self,
        plans: &[Plan],
        reserve: wire::Amount,
        trim: Option<wire::Trim>,
        now: Option<i64>,
    ) -> CheckOutcome {
        let now = now.unwrap_or_else(system_ms);
        self.with_states(plans, now, |states, _| {
            (check_states(plans, states, reserve, trim, now), true)
        })
    }

    /// Applies a settlement; with an `id`, only the first time that id is seen. `alerting`: a
    /// report's settlement, which raises alerts (a refund never does).
    pub fn settle(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
        alerting: bool,
    ) -> (Applied, Vec<Crossing>) {
        let now = now.unwrap_or_else(system_ms);
        self.with_states(plans, now, |states, marks| {
            let seen = match id {
                Some(id) => self.with_source(id.source, |s| s.reports.first_time(id.seq)),
                None => Dedup::First,
            };
            match seen {
                Dedup::First => {
                    let marks = alerting.then_some(marks);
                    let crossings = settle_states(plans, states, marks, settlement, now);
                    ((Applied::Yes, crossings), true)
                }
                Dedup::Duplicate => ((Applied::Duplicate, Vec::new()), false),
                Dedup::Stale => ((Applied::Stale, Vec::new()), false),
            }
        })
    }

    /// Runs `f` on what is remembered of `source`, making room for it if needed.
    fn with_source<T>(&self, source: u64, f: impl FnOnce(&mut SourceLog) -> T) -> T {
        let now = system_ms();
        let mut all = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains_key(&source) && all.len() >= MAX_SOURCES {
            all.retain(|_, s| s.touched + sources::TTL_MS > now);
            if all.len() >= MAX_SOURCES {
                if let Some(oldest) = all.iter().min_by_key(|(_, s)| s.touched).map(|(k, _)| *k) {
                    all.remove(&oldest);
                }
            }
        }
        let log = all.entry(source).or_default();
        log.touched = now;
        f(log)
    }

    pub fn mark_reserved(&self, id: SeqId) -> Mark {
        self.with_source(id.source, |s| s.reservations.mark(id.seq))
    }

    pub fn release(&self, id: SeqId) -> bool {
        self.with_source(id.source, |s| s.reservations.release(id.seq))
    }

    /// Every meter stored under the plan's counter (the plan's own meters are ignored).
    pub fn peek(&self, plan: &Plan, now: Option<i64>, sliding: bool) -> Vec<(Meter, Status)> {
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
            .filter_map(|(field, state, budget)| {
                Meter::inspect(field, *state, Some(*budget), now, sliding)
            })
            .collect()
    }

    /// Drops expired counters and idle sources; run periodically so idle keys do not hold
    /// memory.
    pub fn sweep(&self, now: i64) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).sweep(now);
        }
        let wall = system_ms();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| s.touched + sources::TTL_MS > wall);
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

    /// Counters evicted to make room since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sources remembered (for metrics).
    pub fn sources(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::CounterId;

    fn plan(value: &str) -> Plan {
        Plan {
            shadow: false,
            alerts: Vec::new(),
            id: CounterId {
                limit: "l".into(),
                value: value.into(),
                shared: false,
            },
            meters: vec![Meter::Window {
                budget: 10,
                window_ms: 1_000_000,
                sliding: true,
                money: None,
            }],
        }
    }

    fn spend(store: &MemoryStore, value: &str, now: i64) {
        let charge = Settlement {
            excess: wire::Amount::tokens(4),
            ..Settlement::default()
        };
        store.settle(None, &[plan(value)], &charge, Some(now), false);
    }

    fn left(store: &MemoryStore, value: &str, now: i64) -> i64 {
        store
            .check(&[plan(value)], wire::Amount::ZERO, None, Some(now))
            .statuses[0][0]
            .remaining
    }

    #[test]
    fn a_full_store_evicts_the_least_recently_used_and_never_refuses() {
        let store = MemoryStore::new(SHARDS * 16);
        spend(&store, "busy", 0);
        for i in 0..20 * SHARDS * 16 {
            spend(&store, &format!("flood-{i}"), 1 + i as i64);
            if i % 50 == 0 {
                // The busy key stays in use, so it is never the least recently used.
                spend(&store, "busy", 1 + i as i64);
            }
        }
        assert!(store.len() <= SHARDS * 16, "{}", store.len());
        assert!(store.evicted() > 0);
        let busy = left(&store, "busy", 1 + 20 * SHARDS as i64 * 16);
        assert!(busy < 10, "an existing counter kept its state: {busy}");
        store.sweep(i64::MAX / 2);
        assert!(store.is_empty());
    }

    #[test]
    fn report_ids_are_remembered_per_source_not_as_counters() {
        let store = MemoryStore::new(SHARDS);
        let charge = Settlement {
            excess: wire::Amount::tokens(1),
            ..Settlement::default()
        };
        for seq in 1..=50_000 {
            let id = SeqId { source: 7, seq };
            assert_eq!(
                store
                    .settle(Some(id), &[plan("x")], &charge, Some(0), false)
                    .0,
                Applied::Yes
            );
        }
        let last = SeqId {
            source: 7,
            seq: 50_000,
        };
        assert_eq!(
            store
                .settle(Some(last), &[plan("x")], &charge, Some(0), false)
                .0,
            Applied::Duplicate
        );
        assert_eq!(store.len(), 1);
        assert_eq!(store.sources(), 1);
        assert_eq!(
            store
                .settle(
                    Some(SeqId { source: 7, seq: 1 }),
                    &[plan("x")],
                    &charge,
                    Some(0),
                    false
                )
                .0,
            Applied::Stale
        );
    }

    #[test]
    fn alerts_are_raised_once_per_threshold_and_window_and_never_by_a_refund() {
        let store = MemoryStore::new(SHARDS);
        let mut p = plan("team");
        p.alerts = [0.5, 0.8, 1.0]
            .iter()
            .filter_map(|f| wire::Threshold::of(*f))
            .collect();
        p.meters = vec![Meter::Window {
            budget: 100,
            window_ms: 1_000,
            sliding: false,
            money: None,
        }];
        let plans = [p];
        let charge = |n: u64, alerting: bool, now: i64| {
            let s = Settlement {
                excess: wire::Amount::tokens(n),
                ..Settlement::default()
            };
            store.settle(None, &plans, &s, Some(now), alerting).1
        };
        let reached = |c: &[Crossing]| -> Vec<u32> {
            c.iter()
                .flat_map(|c| c.thresholds.iter().map(|t| t.permille()))
                .collect()
        };
        assert!(charge(49, true, 0).is_empty());
        // A settlement that is not a report's (a trimmed grant's refund, an undo) never raises,
        // and does not spend the alert either.
        assert!(charge(1, false, 1).is_empty());
        let c = charge(0, true, 2);
        assert_eq!(reached(&c), [500]);
        assert_eq!((c[0].used, c[0].budget, c[0].window), (50, 100, (0, 1_000)));
        assert!(
            charge(10, true, 3).is_empty(),
            "0.5 was raised in this window"
        );
        // One report past two thresholds raises both.
        assert_eq!(reached(&charge(50, true, 4)), [800, 1000]);
        assert!(charge(500, true, 5).is_empty());
        // The marks are no meters: a read and an admin grant see only the meter.
        assert_eq!(store.peek(&plans[0], Some(6), false).len(), 1);
        store.adjust(&plans[0], Some(1_000), Some(6));
        assert!(charge(1, true, 7).is_empty(), "still raised in this window");
        // The next window raises again.
        assert_eq!(reached(&charge(60, true, 1_000)), [500]);
    }
}
