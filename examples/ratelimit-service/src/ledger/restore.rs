//! Calendar budgets that outlive their store: before a calendar counter (day, week, month) is
//! checked, a counter whose period this store's life has not marked is given the period's
//! spend so far from the ledger, less what the store holds already. That is the state a store restarted empty (a Redis
//! without persistence, a failover to a replica that had not synced, a memory store's restart)
//! leaves behind (an eviction may take the counter and its marker apart: Redis runs with
//! `noeviction`).
//!
//! Each counter and period is looked at once per process, again after the store's epoch
//! changes (a key Redis loses with everything else, read at most once a second), and at least
//! every [`RECHECK_MS`]. Across replicas, a marker beside the counter (in its Redis Cluster
//! slot, lost with it) lets one replica restore a counter once per period.

use std::collections::HashMap;
use std::sync::Mutex;

/// A counter's period is looked at again after this long, whatever the epoch says (a Redis
/// Cluster node that lost its slots does not hold the epoch key).
pub const RECHECK_MS: i64 = 60_000;
/// After a restore failed (the ledger or the store unreachable), checks go on without
/// restoring for this long.
pub const PAUSE_MS: i64 = 10_000;
/// The store's epoch is read at most this often.
const EPOCH_EVERY_MS: i64 = 1_000;
/// Counters remembered as looked at; past this the memory is cleared (each is looked at again).
const MAX_REMEMBERED: usize = 100_000;

/// Which counters' periods this process has looked at, in which store epoch.
#[derive(Default)]
pub struct Restored {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (storage key, meter field, period start) → when it was looked at.
    seen: HashMap<(String, String, i64), i64>,
    epoch: Option<String>,
    epoch_read_ms: Option<i64>,
    paused_until: i64,
}

impl Restored {
    /// Whether restoring is paused at `now_ms` (after a failure).
    pub fn paused(&self, now_ms: i64) -> bool {
        self.inner.lock().is_ok_and(|i| now_ms < i.paused_until)
    }

    pub fn pause(&self, now_ms: i64) {
        if let Ok(mut i) = self.inner.lock() {
            i.paused_until = now_ms + PAUSE_MS;
        }
    }

    /// Whether the store's epoch should be read again at `now_ms`.
    pub fn epoch_due(&self, now_ms: i64) -> bool {
        self.inner
            .lock()
            .map(|i| i.epoch_read_ms.is_none_or(|t| now_ms - t >= EPOCH_EVERY_MS))
            .unwrap_or(false)
    }

    /// The store's epoch as read at `now_ms`: a new one forgets every counter looked at.
    pub fn saw_epoch(&self, epoch: Option<String>, now_ms: i64) {
        if let Ok(mut i) = self.inner.lock() {
            if i.epoch != epoch {
                if i.epoch.is_some() {
                    tracing::warn!(
                        "the counters' store has a new epoch (it lost its data): calendar counters are restored from the ledger"
                    );
                }
                i.seen.clear();
                i.epoch = epoch;
            }
            i.epoch_read_ms = Some(now_ms);
        }
    }

    /// Whether counter `key`'s meter `field` in the period starting at `start_ms` must be
    /// looked at (`now_ms`).
    pub fn due(&self, key: &str, field: &str, start_ms: i64, now_ms: i64) -> bool {
        // Without an epoch (the memory store) the store lives as long as the process: once.
        self.inner.lock().is_ok_and(|i| {
            i.seen
                .get(&(key.to_string(), field.to_string(), start_ms))
                .is_none_or(|t| i.epoch.is_some() && now_ms - t >= RECHECK_MS)
        })
    }

    pub fn looked_at(&self, key: &str, field: &str, start_ms: i64, now_ms: i64) {
        if let Ok(mut i) = self.inner.lock() {
            if i.seen.len() >= MAX_REMEMBERED {
                i.seen.clear();
            }
            i.seen
                .insert((key.to_string(), field.to_string(), start_ms), now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_looked_at_once_per_epoch_and_recheck() {
        let r = Restored::default();
        assert!(r.epoch_due(0));
        r.saw_epoch(Some("a".into()), 0);
        assert!(!r.epoch_due(500));
        assert!(r.due("k", "c:1", 10, 0));
        r.looked_at("k", "c:1", 10, 0);
        assert!(!r.due("k", "c:1", 10, 1_000));
        assert!(r.due("k", "c:1", 20, 1_000), "another period");
        assert!(r.due("k", "c:1", 10, RECHECK_MS));
        r.saw_epoch(Some("a".into()), 1_000);
        assert!(!r.due("k", "c:1", 10, 1_000), "same epoch");
        r.saw_epoch(Some("b".into()), 2_000);
        assert!(r.due("k", "c:1", 10, 2_000), "a new epoch forgets");
    }
}
