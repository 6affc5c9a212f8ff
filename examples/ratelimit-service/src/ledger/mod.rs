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
pub use rows::{bucket, storable, Entry, LedgerError, RowKey, Sums, BUCKET_MS};

/// Entries that may wait for the database before the oldest are folded into sums.
pub const MAX_WAITING: usize = 200_000;
/// …or before the text they carry passes this.
pub const MAX_WAITING_BYTES: usize = 128 << 20;
/// Entries per write transaction, and the most text one carries (PostgreSQL takes at most
/// 1 GiB per parameter).
const BATCH: usize = 5_000;
const BATCH_BYTES: usize = 16 << 20;
/// Written at least this often while entries wait.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// A write waits at most this long for the database.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A check waits at most this long for the ledger's figure of a counter to restore.
pub const RESTORE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Report ids are kept this long: a resend comes within minutes, never days.
const KEEP_IDS_MS: i64 = 2 * 24 * 3_600_000;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct LedgerStats {
    pub entries_written: AtomicU64,
    pub entries_duplicate: AtomicU64,
    pub entries_folded: AtomicU64,
    pub entries_refused: AtomicU64,
    pub write_errors: AtomicU64,
    pub waiting: AtomicU64,
}

/// Entries not yet written, and sums folded from entries that waited too long.
#[derive(Default)]
struct Waiting {
    entries: VecDeque<Entry>,
    /// The text the waiting entries carry ([`Entry::text_bytes`]).
    bytes: usize,
    folded: BTreeMap<RowKey, Sums>,
    /// Distinguishes the ids of folded batches (written as `folded-<process>-<n>`).
    folds: u64,
    /// A fold being written, or whose write failed: retried under the same id (its commit
    /// may have happened), never merged into a new one.
    unsettled_fold: Option<(String, BTreeMap<RowKey, Sums>)>,
}

/// The ledger: a queue in front of the database, and the connection that drains it.
pub struct SpendLedger {
    waiting: Mutex<Waiting>,
    /// One writer at a time (the background task, or a reader making the ledger current).
    db: tokio::sync::Mutex<Database>,
    wake: tokio::sync::Notify,
    stats: LedgerStats,
    /// Tells folded batches of one process from another's (random).
    process: u64,
}

impl SpendLedger {
    /// A ledger writing to the PostgreSQL database at `url` (connected, and its schema
    /// migrated, on first use).
    pub fn new(url: &str) -> Result<Arc<SpendLedger>, LedgerError> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Ok(Arc::new(SpendLedger {
            waiting: Mutex::default(),
            db: tokio::sync::Mutex::new(Database::new(url)?),
            wake: tokio::sync::Notify::new(),
            stats: LedgerStats::default(),
            process: h.finish(),
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
        w.bytes += entry.text_bytes();
        w.entries.push_back(entry);
        if w.entries.len() > MAX_WAITING || w.bytes > MAX_WAITING_BYTES {
            // The database has been away long: the oldest half is kept as sums.
            let fold = w.entries.len() / 2;
            let old: Vec<Entry> = w.entries.drain(..fold).collect();
            for e in old {
                w.bytes = w.bytes.saturating_sub(e.text_bytes());
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

    /// Writes what was waiting when it was called (entries queued meanwhile are left to the
    /// next call, so a reader never waits on a stream of new reports); `Ok(entries written)`.
    /// The database is held one batch at a time. A batch that fails to reach the database
    /// goes back to the front of the queue, whole; one the database refuses (a value it
    /// cannot store) is written entry by entry, and an entry refused alone is dropped and
    /// counted.
    pub async fn flush(&self) -> Result<usize, LedgerError> {
        // (+1: a fold waiting with no entries is one batch too.)
        let mut left = self.waiting.lock().map_or(0, |w| w.entries.len()) + 1;
        let mut written = 0;
        while left > 0 {
            let (batch, folded) = self.take(left);
            if batch.is_empty() && folded.is_none() {
                break;
            }
            left = left.saturating_sub(batch.len().max(1));
            let mut db = self.db.lock().await;
            match write(&mut db, &batch, folded.as_ref()).await {
                Ok(duplicates) => {
                    written += batch.len();
                    self.counted(batch.len(), duplicates);
                    if let Ok(mut w) = self.waiting.lock() {
                        w.unsettled_fold = None;
                    }
                }
                Err(LedgerError::Refused(why)) if batch.len() > 1 || folded.is_some() => {
                    tracing::warn!(
                        "spend ledger: a batch was refused ({why}); writing it entry by entry"
                    );
                    self.stats.write_errors.fetch_add(1, Relaxed);
                    if let Some(folded) = &folded {
                        self.one_by_one(&mut db, &[], Some(folded)).await?;
                        // Written or dropped as refused: either way it is settled.
                        if let Ok(mut w) = self.waiting.lock() {
                            w.unsettled_fold = None;
                        }
                    }
                    for entry in &batch {
                        self.one_by_one(&mut db, std::slice::from_ref(entry), None)
                            .await
                            .inspect_err(|_| {
                                // The rest waits (the database went away meanwhile).
                                let at = batch.iter().position(|e| std::ptr::eq(e, entry));
                                self.give_back(batch[at.unwrap_or(0)..].to_vec(), None);
                            })?;
                    }
                    written += batch.len();
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Relaxed);
                    db.reset();
                    self.give_back(batch, folded);
                    return Err(e);
                }
            }
        }
        Ok(written)
    }

    /// Writes one entry (or the folded sums) alone: refused, it is dropped and counted;
    /// `Err` only when the database cannot be reached.
    async fn one_by_one(
        &self,
        db: &mut Database,
        entry: &[Entry],
        folded: Option<&(String, BTreeMap<RowKey, Sums>)>,
    ) -> Result<(), LedgerError> {
        match write(db, entry, folded).await {
            Ok(duplicates) => {
                self.counted(entry.len(), duplicates);
                Ok(())
            }
            Err(LedgerError::Refused(why)) => {
                tracing::error!("spend ledger: an entry the database refuses was dropped: {why}");
                self.stats.entries_refused.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                db.reset();
                Err(e)
            }
        }
    }

    fn counted(&self, n: usize, duplicates: usize) {
        let s = &self.stats;
        s.entries_written
            .fetch_add(n.saturating_sub(duplicates) as u64, Relaxed);
        s.entries_duplicate.fetch_add(duplicates as u64, Relaxed);
    }

    /// The next batch (at most `most` entries, [`BATCH`], and [`BATCH_BYTES`] of text), and
    /// the folded sums with the id they are written under: a fold whose write may or may not
    /// have committed keeps its id until it is known to have.
    #[allow(clippy::type_complexity)]
    fn take(&self, most: usize) -> (Vec<Entry>, Option<(String, BTreeMap<RowKey, Sums>)>) {
        let Ok(mut w) = self.waiting.lock() else {
            return (Vec::new(), None);
        };
        let (mut n, mut bytes) = (0, 0);
        for e in w.entries.iter().take(most.min(BATCH)) {
            bytes += e.text_bytes();
            if n > 0 && bytes > BATCH_BYTES {
                break;
            }
            n += 1;
        }
        let batch: Vec<Entry> = w.entries.drain(..n).collect();
        w.bytes = w.bytes.saturating_sub(bytes_of(&batch));
        let folded = match w.unsettled_fold.clone() {
            Some(f) => Some(f),
            None if !w.folded.is_empty() => {
                w.folds += 1;
                let id = format!("folded-{:016x}-{}", self.process, w.folds);
                let f = (id, std::mem::take(&mut w.folded));
                w.unsettled_fold = Some(f.clone());
                Some(f)
            }
            None => None,
        };
        self.stats.waiting.store(w.entries.len() as u64, Relaxed);
        (batch, folded)
    }

    fn give_back(&self, batch: Vec<Entry>, _folded: Option<(String, BTreeMap<RowKey, Sums>)>) {
        let Ok(mut w) = self.waiting.lock() else {
            return;
        };
        // (The fold stays as `unsettled_fold`, under its id, until a write commits it.)
        w.bytes += bytes_of(&batch);
        for e in batch.into_iter().rev() {
            w.entries.push_front(e);
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
    /// units, after writing what waited when it was asked (the reports the store holds are
    /// then in it too). Within [`RESTORE_TIMEOUT`]: a check waits no longer.
    pub async fn spent_since(
        &self,
        limit: &str,
        value: &str,
        shared: bool,
        since_ms: i64,
    ) -> Result<Sums, LedgerError> {
        let query = async {
            self.flush().await?;
            let mut db = self.db.lock().await;
            let sums = db.spent_since(limit, value, shared, since_ms).await;
            if sums.is_err() {
                db.reset();
            }
            sums
        };
        tokio::time::timeout(RESTORE_TIMEOUT, query)
            .await
            .unwrap_or_else(|_| {
                Err(LedgerError::Unreachable(
                    "the ledger did not answer in time".into(),
                ))
            })
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

fn bytes_of(batch: &[Entry]) -> usize {
    batch.iter().map(Entry::text_bytes).sum()
}

/// One batch written within [`WRITE_TIMEOUT`].
async fn write(
    db: &mut Database,
    batch: &[Entry],
    folded: Option<&(String, BTreeMap<RowKey, Sums>)>,
) -> Result<usize, LedgerError> {
    tokio::time::timeout(WRITE_TIMEOUT, db.write(batch, folded))
        .await
        .unwrap_or_else(|_| Err(LedgerError::Unreachable("the write timed out".into())))
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
    fn large_entries_are_folded_by_the_text_they_carry() {
        let ledger = SpendLedger::new("postgres://nobody@127.0.0.1:1/none").unwrap();
        let big = "v".repeat(64 * 1024);
        for i in 0..3_000 {
            ledger.record(entry(&format!("r{i}"), &big, 1));
        }
        let w = ledger.waiting.lock().unwrap();
        assert!(w.bytes <= MAX_WAITING_BYTES, "{}", w.bytes);
        assert!(ledger.stats().entries_folded.load(Relaxed) > 0);
        let kept: i64 = w.folded.values().map(|s| s.tokens).sum::<i64>() + w.entries.len() as i64;
        assert_eq!(kept, 3_000, "every token kept");
    }

    #[test]
    fn entries_past_the_bound_are_folded_not_lost() {
        let ledger = SpendLedger::new("postgres://nobody@127.0.0.1:1/none").unwrap();
        for i in 0..=MAX_WAITING {
            ledger.record(entry(&format!("r{i}"), "x", 1));
        }
        let (batch, folded) = ledger.take(usize::MAX);
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
