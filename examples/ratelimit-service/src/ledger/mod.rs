//! The spend ledger: what every applied report's requests used, kept in PostgreSQL as
//! quarter-hour sums per (limit, key value, model, currency), so that spend outlives the
//! counters' store (a Redis restart, a memory store's restart) and finance can ask who spent
//! what ([`report`] answers `GET /v1/spend`).
//!
//! Off the check and report path: a report hands its entry to [`SpendLedger::record`] (a
//! push under a mutex) and a background task writes what waits, in one transaction per batch.
//! Every entry carries its report's id, and the transaction records the ids it adds, so an
//! entry written twice (a resend the store could no longer tell apart, a batch retried after
//! its commit's answer was lost) counts once. While the database is down entries wait, up to
//! [`MAX_WAITING`]; past that the oldest are folded into sums (spend kept, their ids
//! forgotten) and counted.

mod postgres;
pub mod report;
pub mod restore;
mod rows;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use postgres::Database;
pub use report::{SpendQuery, SpendRow};
use rows::now_ms;
#[cfg(test)]
use rows::{aggregate, distinct};
pub use rows::{bucket, Entry, LedgerError, RowKey, Sums, BUCKET_MS};

/// Entries that may wait for the database before the oldest are folded into sums.
pub const MAX_WAITING: usize = 200_000;
/// Entries per write transaction.
const BATCH: usize = 5_000;
/// Written at least this often while entries wait.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// A write waits at most this long for the database.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Report ids are kept this long: a resend comes within minutes, never days.
const KEEP_IDS_MS: i64 = 7 * 24 * 3_600_000;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct LedgerStats {
    pub entries_written: AtomicU64,
    pub entries_duplicate: AtomicU64,
    pub entries_folded: AtomicU64,
    pub write_errors: AtomicU64,
    pub waiting: AtomicU64,
}

/// Entries not yet written, and sums folded from entries that waited too long.
#[derive(Default)]
struct Waiting {
    entries: VecDeque<Entry>,
    folded: BTreeMap<RowKey, Sums>,
    /// Distinguishes the ids of folded batches (written as `folded-<start>-<n>`).
    folds: u64,
}

/// The ledger: a queue in front of the database, and the connection that drains it.
pub struct SpendLedger {
    waiting: Mutex<Waiting>,
    /// One writer at a time (the background task, or a reader making the ledger current).
    db: tokio::sync::Mutex<Database>,
    wake: tokio::sync::Notify,
    stats: LedgerStats,
    /// Tells folded batches of one process from another's.
    started_ms: i64,
}

impl SpendLedger {
    /// A ledger writing to the PostgreSQL database at `url` (connected, and its schema
    /// migrated, on first use).
    pub fn new(url: &str, started_ms: i64) -> Result<Arc<SpendLedger>, LedgerError> {
        Ok(Arc::new(SpendLedger {
            waiting: Mutex::default(),
            db: tokio::sync::Mutex::new(Database::new(url)?),
            wake: tokio::sync::Notify::new(),
            stats: LedgerStats::default(),
            started_ms,
        }))
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Queues what an applied report adds; never waits for the database.
    pub fn record(&self, entry: Entry) {
        if entry.rows.is_empty() {
            return;
        }
        let Ok(mut w) = self.waiting.lock() else {
            return;
        };
        w.entries.push_back(entry);
        if w.entries.len() > MAX_WAITING {
            // The database has been away long: the oldest half is kept as sums.
            let fold = w.entries.len() / 2;
            let old: Vec<Entry> = w.entries.drain(..fold).collect();
            for e in old {
                for (key, sums) in e.rows {
                    w.folded.entry(key).or_default().add(sums);
                }
            }
            self.stats.entries_folded.fetch_add(fold as u64, Relaxed);
            tracing::warn!("spend ledger: {fold} entries waited too long and were folded into sums (spend kept, ids forgotten)");
        }
        let n = w.entries.len();
        self.stats.waiting.store(n as u64, Relaxed);
        drop(w);
        if n >= BATCH {
            self.wake.notify_one();
        }
    }

    /// Writes everything waiting now; `Ok(entries written)`. A batch that fails goes back to
    /// the front of the queue, whole, and is written again later.
    pub async fn flush(&self) -> Result<usize, LedgerError> {
        let mut db = self.db.lock().await;
        let mut written = 0;
        loop {
            let (batch, folded) = self.take();
            if batch.is_empty() && folded.is_none() {
                return Ok(written);
            }
            let n = batch.len();
            let result =
                tokio::time::timeout(WRITE_TIMEOUT, db.write(&batch, folded.as_ref())).await;
            let result = result
                .unwrap_or_else(|_| Err(LedgerError::Unreachable("the write timed out".into())));
            match result {
                Ok(duplicates) => {
                    written += n;
                    self.stats
                        .entries_written
                        .fetch_add((n - duplicates) as u64, Relaxed);
                    self.stats
                        .entries_duplicate
                        .fetch_add(duplicates as u64, Relaxed);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Relaxed);
                    db.reset();
                    self.give_back(batch, folded);
                    return Err(e);
                }
            }
        }
    }

    /// The next batch: entries, and the folded sums with the id they are written under.
    #[allow(clippy::type_complexity)]
    fn take(&self) -> (Vec<Entry>, Option<(String, BTreeMap<RowKey, Sums>)>) {
        let Ok(mut w) = self.waiting.lock() else {
            return (Vec::new(), None);
        };
        let n = w.entries.len().min(BATCH);
        let batch: Vec<Entry> = w.entries.drain(..n).collect();
        let folded = (!w.folded.is_empty()).then(|| {
            w.folds += 1;
            let id = format!("folded-{}-{}", self.started_ms, w.folds);
            (id, std::mem::take(&mut w.folded))
        });
        self.stats.waiting.store(w.entries.len() as u64, Relaxed);
        (batch, folded)
    }

    fn give_back(&self, batch: Vec<Entry>, folded: Option<(String, BTreeMap<RowKey, Sums>)>) {
        let Ok(mut w) = self.waiting.lock() else {
            return;
        };
        for e in batch.into_iter().rev() {
            w.entries.push_front(e);
        }
        if let Some((_, sums)) = folded {
            // Its id was never committed (the transaction failed): folded again under a new
            // one, with whatever was folded since.
            for (key, s) in sums {
                w.folded.entry(key).or_default().add(s);
            }
        }
        self.stats.waiting.store(w.entries.len() as u64, Relaxed);
    }

    /// The spend `query` asks for, after writing what waits (a reader sees every report
    /// applied before it asked).
    pub async fn spend(&self, query: &SpendQuery) -> Result<Vec<SpendRow>, LedgerError> {
        self.flush().await?;
        let mut db = self.db.lock().await;
        let rows = tokio::time::timeout(WRITE_TIMEOUT, db.spend(query)).await;
        let rows = rows.unwrap_or_else(|_| Err(LedgerError::Unreachable("timed out".into())));
        if rows.is_err() {
            db.reset();
        }
        rows
    }

    /// What a counter spent since `since_ms` (its calendar period's start): tokens and micro
    /// units, after writing what waits.
    pub async fn spent_since(
        &self,
        limit: &str,
        value: &str,
        shared: bool,
        since_ms: i64,
    ) -> Result<Sums, LedgerError> {
        self.flush().await?;
        let mut db = self.db.lock().await;
        let sums = db.spent_since(limit, value, shared, since_ms).await;
        if sums.is_err() {
            db.reset();
        }
        sums
    }

    /// Writes in the background until the ledger is dropped: every [`FLUSH_EVERY`], or at
    /// once when a batch is full; retries a database that is away with growing pauses.
    pub fn spawn(self: &Arc<Self>) {
        let weak: Weak<SpendLedger> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pause = FLUSH_EVERY;
            let mut pruned_at = 0;
            loop {
                let Some(ledger) = weak.upgrade() else {
                    return;
                };
                let woken = ledger.wake.notified();
                match ledger.flush().await {
                    Ok(_) => pause = FLUSH_EVERY,
                    Err(e) => {
                        tracing::warn!("{e}; entries wait and are written again");
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
                let now = now_ms();
                if now - pruned_at > 600_000 && ledger.prune(now - KEEP_IDS_MS).await.is_ok() {
                    pruned_at = now;
                }
                tokio::select! {
                    () = woken => {},
                    () = tokio::time::sleep(pause) => {},
                }
            }
        });
    }

    async fn prune(&self, before_ms: i64) -> Result<(), LedgerError> {
        let mut db = self.db.lock().await;
        db.prune(before_ms).await
    }

    /// The ledger's lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let g = |c: &AtomicU64| c.load(Relaxed);
        let s = &self.stats;
        let _ = write!(
            out,
            "# HELP ratelimit_ledger_entries_total Report entries the spend ledger handled, by outcome.\n\
             # TYPE ratelimit_ledger_entries_total counter\n\
             ratelimit_ledger_entries_total{{outcome=\"written\"}} {}\n\
             ratelimit_ledger_entries_total{{outcome=\"duplicate\"}} {}\n\
             ratelimit_ledger_entries_total{{outcome=\"folded\"}} {}\n\
             # HELP ratelimit_ledger_write_errors_total Ledger writes that failed (retried).\n\
             # TYPE ratelimit_ledger_write_errors_total counter\n\
             ratelimit_ledger_write_errors_total {}\n\
             # HELP ratelimit_ledger_waiting Report entries waiting to be written.\n\
             # TYPE ratelimit_ledger_waiting gauge\n\
             ratelimit_ledger_waiting {}\n",
            g(&s.entries_written),
            g(&s.entries_duplicate),
            g(&s.entries_folded),
            g(&s.write_errors),
            g(&s.waiting),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(value: &str, bucket_ms: i64) -> RowKey {
        RowKey {
            limit: "team".into(),
            value: value.into(),
            shared: false,
            model: "m".into(),
            currency: "USD".into(),
            bucket_ms,
        }
    }

    fn entry(id: &str, value: &str, tokens: i64) -> Entry {
        Entry {
            id: id.into(),
            rows: vec![(
                key(value, 0),
                Sums {
                    requests: 1,
                    tokens,
                    cost_micros: 10 * tokens,
                },
            )],
        }
    }

    #[test]
    fn buckets_are_quarter_hours() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(BUCKET_MS - 1), 0);
        assert_eq!(bucket(BUCKET_MS), BUCKET_MS);
        assert_eq!(bucket(-1), -BUCKET_MS);
    }

    #[test]
    fn a_batch_counts_an_id_once() {
        let batch = vec![entry("a", "x", 5), entry("a", "x", 5), entry("b", "x", 7)];
        let sums = aggregate(distinct(&batch).into_iter());
        assert_eq!(
            sums.get(&key("x", 0)).copied().unwrap(),
            Sums {
                requests: 2,
                tokens: 12,
                cost_micros: 120
            }
        );
    }

    #[test]
    fn entries_past_the_bound_are_folded_not_lost() {
        let ledger = SpendLedger::new("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
        for i in 0..=MAX_WAITING {
            ledger.record(entry(&format!("r{i}"), "x", 1));
        }
        let (batch, folded) = ledger.take();
        let (_, folded) = folded.unwrap();
        let folded_tokens = folded.get(&key("x", 0)).unwrap().tokens;
        let waiting = ledger.waiting.lock().unwrap().entries.len();
        assert_eq!(
            folded_tokens as usize + batch.len() + waiting,
            MAX_WAITING + 1,
            "every token kept"
        );
        assert_eq!(
            ledger.stats().entries_folded.load(Relaxed),
            folded_tokens as u64
        );
    }
}
