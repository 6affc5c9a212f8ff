//! The one sink the limiter feeds the console through: what reached the counters and which
//! checks were denied. It never answers a check or a report and never makes one wait; the
//! console reads back from it. In process for the memory store ([`Board`]), in Redis for the
//! Redis store ([`RedisBoard`]), so every replica shows the same page.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use super::board::ConsoleEvent;
use super::board::{self, Board, Denial, Minute, Ranking};
use super::redis::RedisBoard;
use crate::store::{Store, StoreError};
use wire::Descriptor;

/// Where the console's data lives: beside the counters.
pub enum Insights {
    Memory(Board),
    Redis(Arc<RedisBoard>),
}

impl Insights {
    /// The sink for a store: in process for memory, in the same Redis for Redis.
    pub fn beside(store: &Store) -> Insights {
        match store {
            Store::Memory(_) => Insights::Memory(Board::default()),
            Store::Redis(r) => Insights::Redis(Arc::new(RedisBoard::new(r.clone()))),
        }
    }

    /// Takes an event without waiting (Redis: through a bounded queue drained in batches).
    pub fn record(&self, event: ConsoleEvent) {
        match self {
            Insights::Memory(b) => match event {
                ConsoleEvent::Charged {
                    now_ms,
                    tokens,
                    spend,
                    used,
                } => {
                    b.per_minute(now_ms, tokens, &spend);
                    for ((limit, value), amount) in &used {
                        b.used(limit, value, *amount);
                    }
                }
                ConsoleEvent::Denied(d) => b.denied(d),
                ConsoleEvent::Alerted(a) => b.alerted(a),
            },
            Insights::Redis(r) => r.record(event),
        }
    }

    /// The last denials, newest first.
    pub async fn denials(&self) -> Result<Vec<Denial>, StoreError> {
        match self {
            Insights::Memory(b) => Ok(b.denials()),
            Insights::Redis(r) => r.denials().await,
        }
    }

    /// The last alerts raised, newest first.
    pub async fn alerts(&self) -> Result<Vec<board::AlertNote>, StoreError> {
        match self {
            Insights::Memory(b) => Ok(b.alerts()),
            Insights::Redis(r) => r.alerts().await,
        }
    }

    /// Every limit seen and its `n` heaviest keys.
    pub async fn top(&self, n: usize) -> Result<Ranking, StoreError> {
        match self {
            Insights::Memory(b) => Ok(b.top(n)),
            Insights::Redis(r) => r.top(n).await,
        }
    }

    /// Tokens and money per minute, the last [`board::MINUTES`] minutes.
    pub async fn timeline(&self, now_ms: i64) -> Result<Vec<Minute>, StoreError> {
        match self {
            Insights::Memory(b) => Ok(b.timeline(now_ms)),
            Insights::Redis(r) => r.timeline(now_ms).await,
        }
    }
}

/// What one check or batch of reports adds to the console: tokens per key and in all, money
/// per currency.
#[derive(Default)]
pub struct Tally {
    used: BTreeMap<(String, String), i64>,
    tokens: i64,
    spend: BTreeMap<String, i64>,
}

impl Tally {
    /// What reached the counters of `descriptors`: a check's reservation, or a report's excess
    /// less its refund (so a request's figures add up to what it used, whether or not it sent
    /// a report).
    pub fn charge<'d>(
        &mut self,
        descriptors: impl Iterator<Item = &'d Descriptor> + Clone,
        tokens: i64,
        micros: i64,
    ) {
        self.tokens += tokens;
        for d in descriptors.clone() {
            let amount = if d.currency.is_some() { micros } else { tokens };
            if amount != 0 {
                *self
                    .used
                    .entry((d.limit.clone(), board::member(&d.value, d.shared)))
                    .or_default() += amount;
            }
        }
        if micros != 0 {
            // Once per currency, however many limits count it.
            let currencies: BTreeSet<&String> =
                descriptors.filter_map(|d| d.currency.as_ref()).collect();
            for c in currencies {
                *self.spend.entry(c.clone()).or_default() += micros;
            }
        }
    }

    /// The event to record, `None` when nothing was charged.
    pub fn event(self, now_ms: i64) -> Option<ConsoleEvent> {
        if self.tokens == 0 && self.spend.is_empty() && self.used.is_empty() {
            return None;
        }
        Some(ConsoleEvent::Charged {
            now_ms,
            tokens: self.tokens,
            spend: self.spend,
            used: self.used,
        })
    }
}
