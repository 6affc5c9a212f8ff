//! What the ledger counts: a row's identity, its sums, a report's entry, and the quarter
//! hours rows are kept in. Plain data, shared by the queue, the database and the reports.

use std::collections::{BTreeMap, HashMap};

/// The ledger's time resolution: quarter hours, so that a calendar period starting on any
/// zone's midnight (offsets of 30 or 45 minutes included) is a whole number of buckets.
pub const BUCKET_MS: i64 = 15 * 60 * 1000;

/// One row's identity: whose spend, on what, when.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub limit: String,
    /// The counter's value (a `shared` pool's pattern for its members).
    pub value: String,
    pub shared: bool,
    /// `""` when the plugin did not read the model.
    pub model: String,
    /// `""` for a limit in tokens (its rows carry no cost).
    pub currency: String,
    /// The quarter hour's start, ms since the epoch.
    pub bucket_ms: i64,
}

/// What a row adds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: i64,
    pub tokens: i64,
    pub cost_micros: i64,
}

impl Sums {
    pub fn add(&mut self, o: Sums) {
        self.requests = self.requests.saturating_add(o.requests);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.cost_micros = self.cost_micros.saturating_add(o.cost_micros);
    }
}

/// What one applied report adds: a row per counter it charged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The report's id: the ledger counts an id once.
    pub id: String,
    pub rows: Vec<(RowKey, Sums)>,
}

impl Entry {
    /// The text it carries, roughly (a batch is bounded by it).
    pub fn text_bytes(&self) -> usize {
        self.id.len()
            + self
                .rows
                .iter()
                .map(|(k, _)| 64 + k.limit.len() + k.value.len() + k.model.len() + k.currency.len())
                .sum::<usize>()
    }
}

/// Text as PostgreSQL stores it: a NUL byte (which it refuses) becomes U+FFFD.
pub fn storable(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

/// The quarter hour holding `ms`.
pub fn bucket(ms: i64) -> i64 {
    ms.saturating_sub(ms.rem_euclid(BUCKET_MS))
}

/// Why the ledger could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the spend ledger's database is unreachable: {0}")]
    Unreachable(String),
    /// The database refused what it was given (a value it cannot store): retrying the same
    /// write cannot help.
    #[error("the spend ledger's database refused a write: {0}")]
    Refused(String),
    #[error("{0}")]
    BadQuery(String),
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Sums entries' rows by key.
pub fn aggregate<'e>(entries: impl Iterator<Item = &'e Entry>) -> BTreeMap<RowKey, Sums> {
    let mut sums: BTreeMap<RowKey, Sums> = BTreeMap::new();
    for e in entries {
        for (key, s) in &e.rows {
            sums.entry(key.clone()).or_default().add(*s);
        }
    }
    sums
}

/// Entries with distinct ids, the first of each (a batch never holds an id twice).
pub fn distinct(batch: &[Entry]) -> Vec<&Entry> {
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(batch.len());
    batch
        .iter()
        .filter(|e| seen.insert(e.id.as_str(), ()).is_none())
        .collect()
}
