//! The console's read model in Redis, shared by every replica: the limits seen, each one's
//! heaviest keys (a space-saving summary kept by `insights.lua`), the recent denials and the
//! per-minute figures, all expiring a day after the last write. Events are queued and written
//! in batches by one background task, so no check or report waits on the console.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::Script;

use super::board::{self, ConsoleEvent};
use crate::store::{RedisStore, StoreError};

/// The console's keys: the limits it has seen, the recent denials (shared by every replica).
const CONSOLE_LIMITS: &str = "ltr:console:limits";
const CONSOLE_DENIALS: &str = "ltr:console:denials";
const CONSOLE_ALERTS: &str = "ltr:console:alerts";
/// Console events waiting for the writer; past it, new ones are dropped (the console is never
/// worth slowing a check).
pub const CONSOLE_QUEUE: usize = 4096;
/// How long the writer gathers events into one batch.
const CONSOLE_BATCH: Duration = Duration::from_millis(100);
/// How long the console's data outlives the last write: a day.
const CONSOLE_TTL_MS: i64 = 86_400_000;

/// The console's data in the Redis the counters live in.
pub struct RedisBoard {
    store: Arc<RedisStore>,
    script: Script,
    /// The queue, drained by one background writer (started on first use).
    queue: OnceLock<tokio::sync::mpsc::Sender<ConsoleEvent>>,
}

impl RedisBoard {
    pub fn new(store: Arc<RedisStore>) -> RedisBoard {
        RedisBoard {
            store,
            script: Script::new(include_str!("insights.lua")),
            queue: OnceLock::new(),
        }
    }

    /// Queues a console event for the background writer; dropped when the queue is full.
    pub fn record(self: &Arc<Self>, event: ConsoleEvent) {
        let tx = self.queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_QUEUE);
            tokio::spawn(console_writer(Arc::downgrade(self), rx));
            tx
        });
        if tx.try_send(event).is_err() {
            tracing::debug!("console event dropped: the writer is {CONSOLE_QUEUE} behind");
        }
    }

    /// Writes one batch: a pipeline per minute, a script per key, the denials and alerts oldest
    /// first.
    async fn write(&self, batch: ConsoleBatch) -> Result<(), StoreError> {
        for (minute_ms, (tokens, spend)) in &batch.minutes {
            self.per_minute(*minute_ms, *tokens, spend).await?;
        }
        for ((limit, value), amount) in &batch.used {
            if *amount != 0 {
                self.used(limit, value, *amount).await?;
            }
        }
        if !batch.denials.is_empty() {
            self.push(CONSOLE_DENIALS, batch.denials.iter(), board::DENIALS)
                .await?;
        }
        if !batch.alerts.is_empty() {
            self.push(CONSOLE_ALERTS, batch.alerts.iter(), board::ALERTS)
                .await?;
        }
        Ok(())
    }

    /// The keys of a limit's heavy hitters (one slot).
    fn top_keys(limit: &str) -> Vec<String> {
        let tag = crate::counter::fnv(limit.as_bytes());
        vec![
            format!("ltr:console:{{{tag:016x}}}:top"),
            format!("ltr:console:{{{tag:016x}}}:over"),
        ]
    }

    pub async fn used(&self, limit: &str, value: &str, tokens: i64) -> Result<(), StoreError> {
        // Limit names come from plugin configurations, not from clients.
        self.store
            .query::<()>(redis::cmd("SADD").arg(CONSOLE_LIMITS).arg(limit).clone())
            .await?;
        let args = vec![
            board::bounded(value).to_string(),
            tokens.to_string(),
            board::TOP_K.to_string(),
            CONSOLE_TTL_MS.to_string(),
        ];
        self.store
            .run_script(&self.script, Self::top_keys(limit), args)
            .await
            .map(|_| ())
    }

    pub async fn per_minute(
        &self,
        now_ms: i64,
        tokens: i64,
        spend: &std::collections::BTreeMap<String, i64>,
    ) -> Result<(), StoreError> {
        let key = format!("ltr:console:minute:{}", board::minute_of(now_ms));
        let mut pipe = redis::pipe();
        pipe.cmd("HINCRBY")
            .arg(&key)
            .arg("tokens")
            .arg(tokens)
            .ignore();
        for (currency, micros) in spend {
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(format!("spend:{currency}"))
                .arg(*micros)
                .ignore();
        }
        pipe.cmd("PEXPIRE").arg(&key).arg(CONSOLE_TTL_MS).ignore();
        self.store.query_pipe(pipe).await
    }

    pub async fn denials(&self) -> Result<Vec<board::Denial>, StoreError> {
        self.list(CONSOLE_DENIALS).await
    }

    pub async fn alerts(&self) -> Result<Vec<board::AlertNote>, StoreError> {
        self.list(CONSOLE_ALERTS).await
    }

    /// A ring of JSON entries, newest first.
    async fn list<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Vec<T>, StoreError> {
        let raw: Vec<String> = self
            .store
            .query(redis::cmd("LRANGE").arg(key).arg(0).arg(-1).clone())
            .await?;
        Ok(raw
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    /// Pushes `entries` (oldest first) onto the ring `key`, kept to `keep` and a day.
    async fn push<T: serde::Serialize>(
        &self,
        key: &str,
        entries: impl Iterator<Item = T>,
        keep: usize,
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("LPUSH")
                .arg(key)
                .arg(serde_json::to_string(&e).unwrap_or_default())
                .ignore();
        }
        pipe.cmd("LTRIM").arg(key).arg(0).arg(keep - 1).ignore();
        pipe.cmd("PEXPIRE").arg(key).arg(CONSOLE_TTL_MS).ignore();
        self.store.query_pipe(pipe).await
    }

    pub async fn top(&self, n: usize) -> Result<board::Ranking, StoreError> {
        let mut limits: Vec<String> = self
            .store
            .query(redis::cmd("SMEMBERS").arg(CONSOLE_LIMITS).clone())
            .await?;
        limits.sort();
        let mut out = Vec::with_capacity(limits.len());
        for limit in limits {
            let [top, over] = <[String; 2]>::try_from(Self::top_keys(&limit)).unwrap_or_default();
            let scored: Vec<(String, f64)> = self
                .store
                .query(
                    redis::cmd("ZREVRANGE")
                        .arg(&top)
                        .arg(0)
                        .arg(n.saturating_sub(1))
                        .arg("WITHSCORES")
                        .clone(),
                )
                .await?;
            // One round trip for the whole list's error bounds.
            let members: Vec<&str> = scored.iter().map(|(m, _)| m.as_str()).collect();
            let overs: Vec<Option<u64>> = if members.is_empty() {
                Vec::new()
            } else {
                self.store
                    .query(redis::cmd("HMGET").arg(&over).arg(&members).clone())
                    .await?
            };
            let keys = scored
                .iter()
                .zip(overs.into_iter().chain(std::iter::repeat(None)))
                .map(|((member, count), over)| {
                    board::Heavy::stored(member, *count as u64, over.unwrap_or(0))
                })
                .collect();
            out.push((limit, keys));
        }
        Ok(out)
    }

    pub async fn timeline(&self, now_ms: i64) -> Result<Vec<board::Minute>, StoreError> {
        let mut known = Vec::new();
        for m in board::timeline(now_ms, std::iter::empty()) {
            let key = format!("ltr:console:minute:{}", m.minute_ms);
            let fields: Vec<(String, i64)> = self
                .store
                .query(redis::cmd("HGETALL").arg(&key).clone())
                .await?;
            let mut minute = m;
            for (field, v) in fields {
                match field.strip_prefix("spend:") {
                    Some(currency) => {
                        minute.spend.insert(currency.to_string(), v);
                    }
                    None if field == "tokens" => minute.tokens = v,
                    None => {}
                }
            }
            known.push(minute);
        }
        Ok(known)
    }
}

/// Console events merged over one batch: figures per minute and per key add up, the newest
/// denials are kept.
#[derive(Default)]
struct ConsoleBatch {
    minutes: std::collections::BTreeMap<i64, (i64, std::collections::BTreeMap<String, i64>)>,
    used: std::collections::BTreeMap<(String, String), i64>,
    denials: std::collections::VecDeque<board::Denial>,
    alerts: std::collections::VecDeque<board::AlertNote>,
    events: usize,
}

impl ConsoleBatch {
    fn add(&mut self, event: ConsoleEvent) {
        self.events += 1;
        match event {
            ConsoleEvent::Charged {
                now_ms,
                tokens,
                spend,
                used,
            } => {
                let minute = self.minutes.entry(board::minute_of(now_ms)).or_default();
                minute.0 += tokens;
                for (currency, micros) in spend {
                    *minute.1.entry(currency).or_default() += micros;
                }
                for (key, amount) in used {
                    *self.used.entry(key).or_default() += amount;
                }
            }
            ConsoleEvent::Alerted(a) => {
                self.alerts.push_back(a);
                if self.alerts.len() > board::ALERTS {
                    self.alerts.pop_front();
                }
            }
            ConsoleEvent::Denied(d) => {
                self.denials.push_back(d);
                if self.denials.len() > board::DENIALS {
                    self.denials.pop_front();
                }
            }
        }
    }
}

/// Drains the console's queue: gathers what arrives within [`CONSOLE_BATCH`] of the first
/// event, merges it, writes it; ends with the board (which holds the only sender).
async fn console_writer(
    board: std::sync::Weak<RedisBoard>,
    mut rx: tokio::sync::mpsc::Receiver<ConsoleEvent>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = ConsoleBatch::default();
        batch.add(first);
        let deadline = tokio::time::Instant::now() + CONSOLE_BATCH;
        while batch.events < CONSOLE_QUEUE {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(event)) => batch.add(event),
                _ => break,
            }
        }
        let Some(board) = board.upgrade() else {
            return;
        };
        if let Err(e) = board.write(batch).await {
            tracing::debug!("console data not recorded: {e}");
        }
    }
}
