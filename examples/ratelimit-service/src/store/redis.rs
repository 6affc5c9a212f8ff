//! The Redis / Redis Cluster store: every check or charge is one `EVALSHA` of `limiter.lua`
//! (reloaded by the client on `NOSCRIPT`), connections reconnect by themselves.
//!
//! A counter's meters share one hash, whose key carries a hash tag, so in a cluster each
//! counter is atomic. A request that spans counters in several slots is sent as one script
//! per counter: a check whose reservation fails on one counter refunds the others (a brief
//! over-denial is possible under contention, an overshoot is not), and each counter
//! remembers report ids on its own, so a retried report is applied exactly once per counter.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use tokio::sync::OnceCell;

use super::model::{Applied, CheckOutcome, ConsoleEvent, Settlement, StoreError};
use super::sources::{self, Dedup, Mark};
use crate::clock::system_ms;
use crate::counter::Plan;
use crate::insights;
use crate::meter::{Meter, State, Status};
use wire::Amount;
use wire::SeqId;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisStore {
    target: RedisTarget,
    /// Set by the first successful connection; the connection then reconnects by itself.
    conn: OnceCell<Conn>,
    script: Script,
    ring: Script,
    insights: Script,
    adjust: Script,
    timeout: Duration,
    /// The console's queue, drained by one background writer (started on first use).
    console: std::sync::OnceLock<tokio::sync::mpsc::Sender<ConsoleEvent>>,
}

/// Where the Redis store connects: one server or a cluster's seed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Reads `--redis-url` values: one `redis://…` is a single server; several, or one
    /// `redis+cluster://[user:pass@]host:port,host:port`, are a cluster.
    pub fn parse(urls: &[String]) -> Result<RedisTarget, String> {
        let mut nodes = Vec::new();
        let mut cluster = urls.len() > 1;
        for url in urls {
            if let Some(rest) = url.strip_prefix("redis+cluster://") {
                cluster = true;
                let (auth, hosts) = match rest.rsplit_once('@') {
                    Some((auth, hosts)) => (format!("{auth}@"), hosts),
                    None => (String::new(), rest),
                };
                for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                    nodes.push(format!("redis://{auth}{host}"));
                }
            } else if url.starts_with("redis://") || url.starts_with("rediss://") {
                nodes.push(url.clone());
            } else {
                return Err(format!("`{url}` is not a redis:// or redis+cluster:// URL"));
            }
        }
        match (cluster, nodes.len()) {
            (_, 0) => Err("no Redis URL given".into()),
            (false, _) => Ok(RedisTarget::Single(nodes.remove(0))),
            (true, _) => Ok(RedisTarget::Cluster(nodes)),
        }
    }
}

/// The console's keys: the limits it has seen, the recent denials (shared by every replica).
const CONSOLE_LIMITS: &str = "ltr:console:limits";
const CONSOLE_DENIALS: &str = "ltr:console:denials";
/// Console events waiting for the writer; past it, new ones are dropped (the console is never
/// worth slowing a check).
pub const CONSOLE_QUEUE: usize = 4096;
/// How long the writer gathers events into one batch.
const CONSOLE_BATCH: Duration = Duration::from_millis(100);
/// How long the console's data outlives the last write: a day.
const CONSOLE_TTL_MS: i64 = 86_400_000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// A store that connects on first use (and again after failed attempts), so the service
    /// can start before Redis and answer 503 until it is there.
    pub fn new(target: RedisTarget, timeout: Duration) -> RedisStore {
        RedisStore {
            target,
            conn: OnceCell::new(),
            script: Script::new(include_str!("limiter.lua")),
            ring: Script::new(include_str!("ring.lua")),
            insights: Script::new(include_str!("insights.lua")),
            adjust: Script::new(include_str!("adjust.lua")),
            timeout,
            console: std::sync::OnceLock::new(),
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.conn
            .get_or_try_init(|| Self::connect(&self.target, self.timeout))
            .await
            .cloned()
    }

    async fn connect(target: &RedisTarget, timeout: Duration) -> Result<Conn, StoreError> {
        Ok(match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                let manager = tokio::time::timeout(
                    timeout * 4,
                    ConnectionManager::new_with_config(client, config),
                )
                .await
                .map_err(|_| unavailable("timed out connecting to Redis"))?
                .map_err(unavailable)?;
                Conn::Single(manager)
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map_err(unavailable)?;
                let conn = tokio::time::timeout(timeout * 4, client.get_async_connection())
                    .await
                    .map_err(|_| unavailable("timed out connecting to the Redis Cluster"))?
                    .map_err(unavailable)?;
                Conn::Cluster(conn)
            }
        })
    }

    async fn run(&self, keys: Vec<String>, args: Vec<String>) -> Result<Vec<i64>, StoreError> {
        self.run_script(&self.script, keys, args).await
    }

    async fn run_script(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut invocation = script.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        for a in &args {
            invocation.arg(a);
        }
        let conn = self.conn().await?;
        let call = async {
            match conn {
                Conn::Single(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
            }
        };
        tokio::time::timeout(self.timeout * 2, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
    }

    /// The script's arguments: `amount` is the reserve (check) or the excess (settle); a
    /// `now` of -1 makes the script read Redis's clock; `dedup`: the report's sequence number,
    /// looked up in the ring whose keys follow the counters'.
    fn args(
        mode: &str,
        now: Option<i64>,
        amount: Amount,
        refund: (Amount, Option<i64>),
        dedup: Option<u64>,
        plans: &[Plan],
    ) -> Vec<String> {
        let mut args = vec![
            mode.to_string(),
            now.unwrap_or(-1).to_string(),
            amount.tokens.to_string(),
            refund.0.tokens.to_string(),
            refund.1.unwrap_or(-1).to_string(),
            dedup.map_or(-1, |seq| seq as i64).to_string(),
            wire::REPORT_WINDOW.to_string(),
            sources::TTL_MS.to_string(),
            amount.micros.to_string(),
            refund.0.micros.to_string(),
        ];
        for plan in plans {
            args.push(plan.meters.len().to_string());
            for m in &plan.meters {
                let (kind, p1, p2, p3) = match *m {
                    Meter::Window {
                        budget: tokens,
                        window_ms,
                        sliding,
                        ..
                    } => (if sliding { "w" } else { "f" }, tokens, window_ms, 0),
                    Meter::Calendar {
                        budget: tokens,
                        start_ms,
                        end_ms,
                        ..
                    } => ("c", tokens, start_ms, end_ms),
                    Meter::Bucket {
                        max,
                        per_fill,
                        interval_ms,
                        ..
                    } => ("b", max, per_fill, interval_ms),
                };
                args.extend([
                    m.field(),
                    kind.into(),
                    p1.to_string(),
                    p2.to_string(),
                    p3.to_string(),
                    m.ttl_ms().to_string(),
                    // Which of the amounts it counts: 0 tokens, 1 money.
                    u8::from(m.money().is_some()).to_string(),
                ]);
            }
        }
        args
    }

    /// Groups of plans that one script call may cover: all of them on a single server, one
    /// per counter in a cluster.
    fn groups<'p>(&self, plans: &'p [Plan]) -> Vec<&'p [Plan]> {
        match self.target {
            RedisTarget::Cluster(_) if !plans.is_empty() => plans.chunks(1).collect(),
            // A report with nothing to charge still has its id remembered.
            _ => vec![plans],
        }
    }

    pub async fn check(
        &self,
        plans: &[Plan],
        reserve: Amount,
        now: Option<i64>,
    ) -> Result<CheckOutcome, StoreError> {
        let groups = self.groups(plans);
        let calls = groups.iter().map(|group| {
            let keys = group.iter().map(|p| p.id.storage_key()).collect();
            self.run(
                keys,
                Self::args("check", now, reserve, (Amount::ZERO, None), None, group),
            )
        });
        let answers = join_all(calls).await;
        let mut allowed = true;
        let mut at_ms = None;
        let mut statuses = Vec::with_capacity(plans.len());
        for (group, answer) in groups.iter().zip(&answers) {
            let Ok(answer) = answer else { continue };
            allowed &= answer.first() == Some(&1);
            at_ms = at_ms.or(answer.get(1).copied());
            let mut figures = answer.iter().skip(2);
            for plan in group.iter() {
                let per_meter = plan
                    .meters
                    .iter()
                    .map(|m| {
                        let mut next = || figures.next().copied().unwrap_or(0);
                        Status {
                            limit: m.limit(),
                            remaining: next(),
                            reset_ms: next(),
                            retry_ms: next(),
                        }
                    })
                    .collect();
                statuses.push(per_meter);
            }
        }
        let at_ms = at_ms.or(now).unwrap_or_else(system_ms);
        if let Some(redis_now) = replan(&answers) {
            self.refund(&groups, &answers, reserve, at_ms, now).await;
            return Err(StoreError::Replan(redis_now));
        }
        let failed = answers
            .iter()
            .find_map(|a| a.as_ref().err().map(|e| e.to_string()));
        if let Some(error) = failed {
            self.refund(&groups, &answers, reserve, at_ms, now).await;
            return Err(unavailable(error));
        }
        if !allowed && !reserve.is_zero() {
            self.refund(&groups, &answers, reserve, at_ms, now).await;
        }
        Ok(CheckOutcome {
            allowed,
            statuses,
            at_ms,
        })
    }

    /// Gives back reservations taken by the groups that admitted, when the request as a whole
    /// did not (denied, failed, or to be planned again).
    async fn refund(
        &self,
        groups: &[&[Plan]],
        answers: &[Result<Vec<i64>, StoreError>],
        reserve: Amount,
        at_ms: i64,
        now: Option<i64>,
    ) {
        if reserve.is_zero() {
            return;
        }
        for (group, answer) in groups.iter().zip(answers) {
            if matches!(answer, Ok(a) if a.first() == Some(&1)) {
                let keys = group.iter().map(|p| p.id.storage_key()).collect();
                let args = Self::args(
                    "settle",
                    now,
                    Amount::ZERO,
                    (reserve, Some(at_ms)),
                    None,
                    group,
                );
                if let Err(e) = self.run(keys, args).await {
                    tracing::warn!("could not refund a reservation: {e}");
                }
            }
        }
    }

    pub async fn settle(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
    ) -> Result<Applied, StoreError> {
        let groups = self.groups(plans);
        let calls = groups.iter().map(|group| {
            let mut keys: Vec<String> = group.iter().map(|p| p.id.storage_key()).collect();
            if let Some(id) = id {
                let ring = self.report_ring_keys(id.source, keys.first().map(String::as_str));
                keys.extend(ring);
            }
            let refund = (settlement.refund, settlement.refund_at);
            let args = Self::args(
                "settle",
                now,
                settlement.excess,
                refund,
                id.map(|id| id.seq),
                group,
            );
            self.run(keys, args)
        });
        let answers = join_all(calls).await;
        // Groups that settled stay settled (their ids are marked): a retry is a duplicate there.
        if let Some(redis_now) = replan(&answers) {
            return Err(StoreError::Replan(redis_now));
        }
        let mut outcome = Applied::Stale;
        for answer in answers {
            match Dedup::from_code(answer?.first().copied().unwrap_or(-1)) {
                Dedup::First => outcome = Applied::Yes,
                Dedup::Duplicate if outcome == Applied::Stale => outcome = Applied::Duplicate,
                _ => {}
            }
        }
        Ok(outcome)
    }

    /// The keys of a source's report ring: one per source on a single server; in a cluster one
    /// per source and counter, in the counter's slot (a script touches one slot), so each
    /// counter applies a report exactly once on its own.
    fn report_ring_keys(&self, source: u64, first_counter: Option<&str>) -> [String; 2] {
        let prefix = match (&self.target, first_counter) {
            (RedisTarget::Cluster(_), Some(counter)) => {
                let tag_end = counter.find('}').map_or(0, |i| i + 1);
                format!("{}:src:{source:016x}", &counter[..tag_end])
            }
            _ => format!("ltr:{{src:{source:016x}}}"),
        };
        [format!("{prefix}:rep"), format!("{prefix}:rephigh")]
    }

    /// The keys of a source's reservation ring: its bits and its high-water mark, in one slot.
    fn ring_keys(source: u64) -> Vec<String> {
        vec![
            format!("ltr:{{src:{source:016x}}}:rsv"),
            format!("ltr:{{src:{source:016x}}}:high"),
        ]
    }

    async fn ring_op(&self, op: &str, id: SeqId) -> Result<i64, StoreError> {
        let args = vec![
            op.to_string(),
            id.seq.to_string(),
            sources::RESERVATION_SLOTS.to_string(),
            sources::TTL_MS.to_string(),
        ];
        let answer = self
            .run_script(&self.ring, Self::ring_keys(id.source), args)
            .await?;
        Ok(answer.first().copied().unwrap_or(-1))
    }

    pub async fn mark_reserved(&self, id: SeqId) -> Result<Mark, StoreError> {
        self.ring_op("mark", id).await.map(Mark::from_code)
    }

    pub async fn release(&self, id: SeqId) -> Result<bool, StoreError> {
        self.ring_op("release", id).await.map(|code| code == 1)
    }

    pub async fn peek(
        &self,
        plan: &Plan,
        now: Option<i64>,
        sliding: bool,
    ) -> Result<Vec<(Meter, Status)>, StoreError> {
        let now = now.unwrap_or_else(system_ms);
        let key = plan.id.storage_key();
        let cmd = redis::cmd("HGETALL").arg(&key).clone();
        let conn = self.conn().await?;
        let call = async {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<Vec<(String, String)>>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<Vec<(String, String)>>(&mut c).await,
            }
        };
        let fields = tokio::time::timeout(self.timeout * 2, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)?;
        Ok(fields
            .iter()
            .filter_map(|(field, raw)| {
                let mut parts = raw.split(',').map(|p| p.parse::<i64>().ok());
                let state: State = [parts.next()??, parts.next()??, parts.next()??];
                // The budget last applied; states written before it was stored have none.
                let budget = parts.next().flatten();
                Meter::inspect(field, state, budget, now, sliding)
            })
            .collect())
    }

    /// Queues a console event for the background writer; dropped when the queue is full.
    pub fn record_console(self: &Arc<Self>, event: ConsoleEvent) {
        let tx = self.console.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_QUEUE);
            tokio::spawn(console_writer(Arc::downgrade(self), rx));
            tx
        });
        if tx.try_send(event).is_err() {
            tracing::debug!("console event dropped: the writer is {CONSOLE_QUEUE} behind");
        }
    }

    /// Writes one batch: a pipeline per minute, a script per key, the denials oldest first.
    async fn write_console(&self, batch: ConsoleBatch) -> Result<(), StoreError> {
        for (minute_ms, (tokens, spend)) in &batch.minutes {
            self.per_minute(*minute_ms, *tokens, spend).await?;
        }
        for ((limit, value), amount) in &batch.used {
            if *amount != 0 {
                self.used(limit, value, *amount).await?;
            }
        }
        for denial in &batch.denials {
            self.denied(denial).await?;
        }
        Ok(())
    }

    /// One command, with the store's deadline.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        let conn = self.conn().await?;
        let call = async {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        };
        tokio::time::timeout(self.timeout * 2, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
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
        self.query::<()>(redis::cmd("SADD").arg(CONSOLE_LIMITS).arg(limit).clone())
            .await?;
        let args = vec![
            insights::bounded(value).to_string(),
            tokens.to_string(),
            insights::TOP_K.to_string(),
            CONSOLE_TTL_MS.to_string(),
        ];
        self.run_script(&self.insights, Self::top_keys(limit), args)
            .await
            .map(|_| ())
    }

    pub async fn per_minute(
        &self,
        now_ms: i64,
        tokens: i64,
        spend: &std::collections::BTreeMap<String, i64>,
    ) -> Result<(), StoreError> {
        let key = format!("ltr:console:minute:{}", insights::minute_of(now_ms));
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
        self.query_pipe(pipe).await
    }

    async fn query_pipe(&self, pipe: redis::Pipeline) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let call = async {
            match conn {
                Conn::Single(mut c) => pipe.query_async::<()>(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async::<()>(&mut c).await,
            }
        };
        tokio::time::timeout(self.timeout * 2, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
    }

    pub async fn denied(&self, denial: &insights::Denial) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH")
            .arg(CONSOLE_DENIALS)
            .arg(serde_json::to_string(denial).unwrap_or_default())
            .ignore();
        pipe.cmd("LTRIM")
            .arg(CONSOLE_DENIALS)
            .arg(0)
            .arg(insights::DENIALS - 1)
            .ignore();
        self.query_pipe(pipe).await
    }

    pub async fn denials(&self) -> Result<Vec<insights::Denial>, StoreError> {
        let raw: Vec<String> = self
            .query(
                redis::cmd("LRANGE")
                    .arg(CONSOLE_DENIALS)
                    .arg(0)
                    .arg(-1)
                    .clone(),
            )
            .await?;
        Ok(raw
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    pub async fn top(&self, n: usize) -> Result<insights::Ranking, StoreError> {
        let mut limits: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(CONSOLE_LIMITS).clone())
            .await?;
        limits.sort();
        let mut out = Vec::with_capacity(limits.len());
        for limit in limits {
            let [top, over] = <[String; 2]>::try_from(Self::top_keys(&limit)).unwrap_or_default();
            let scored: Vec<(String, f64)> = self
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
                self.query(redis::cmd("HMGET").arg(&over).arg(&members).clone())
                    .await?
            };
            let keys = scored
                .iter()
                .zip(overs.into_iter().chain(std::iter::repeat(None)))
                .map(|((member, count), over)| {
                    insights::Heavy::stored(member, *count as u64, over.unwrap_or(0))
                })
                .collect();
            out.push((limit, keys));
        }
        Ok(out)
    }

    pub async fn timeline(&self, now_ms: i64) -> Result<Vec<insights::Minute>, StoreError> {
        let mut known = Vec::new();
        for m in insights::timeline(now_ms, std::iter::empty()) {
            let key = format!("ltr:console:minute:{}", m.minute_ms);
            let fields: Vec<(String, i64)> =
                self.query(redis::cmd("HGETALL").arg(&key).clone()).await?;
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

    /// Grants `amount` more to every meter of the counter now, or resets it (`None`).
    pub async fn adjust(&self, plan: &Plan, grant: Option<i64>) -> Result<usize, StoreError> {
        let args = match grant {
            Some(amount) => vec!["grant".to_string(), amount.to_string()],
            None => vec!["reset".to_string(), "0".to_string()],
        };
        let n = self
            .run_script(&self.adjust, vec![plan.id.storage_key()], args)
            .await?;
        Ok(n.first().copied().unwrap_or(0).max(0) as usize)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let call = async {
            match conn {
                Conn::Single(mut c) => redis::cmd("PING").query_async::<Value>(&mut c).await,
                Conn::Cluster(mut c) => redis::cmd("PING").query_async::<Value>(&mut c).await,
            }
        };
        tokio::time::timeout(self.timeout * 2, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// Console events merged over one batch: figures per minute and per key add up, the newest
/// denials are kept.
#[derive(Default)]
struct ConsoleBatch {
    minutes: std::collections::BTreeMap<i64, (i64, std::collections::BTreeMap<String, i64>)>,
    used: std::collections::BTreeMap<(String, String), i64>,
    denials: std::collections::VecDeque<insights::Denial>,
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
                let minute = self.minutes.entry(insights::minute_of(now_ms)).or_default();
                minute.0 += tokens;
                for (currency, micros) in spend {
                    *minute.1.entry(currency).or_default() += micros;
                }
                for (key, amount) in used {
                    *self.used.entry(key).or_default() += amount;
                }
            }
            ConsoleEvent::Denied(d) => {
                self.denials.push_back(d);
                if self.denials.len() > insights::DENIALS {
                    self.denials.pop_front();
                }
            }
        }
    }
}

/// Drains the console's queue: gathers what arrives within [`CONSOLE_BATCH`] of the first
/// event, merges it, writes it; ends with the store (which holds the only sender).
async fn console_writer(
    store: std::sync::Weak<RedisStore>,
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
        let Some(store) = store.upgrade() else {
            return;
        };
        if let Err(e) = store.write_console(batch).await {
            tracing::debug!("console data not recorded: {e}");
        }
    }
}

/// Redis's time, when a script answered that a calendar meter must be planned again at it.
fn replan(answers: &[Result<Vec<i64>, StoreError>]) -> Option<i64> {
    answers.iter().find_map(|a| match a.as_deref() {
        Ok([-1, now, ..]) => Some(*now),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RedisTarget::parse(&["redis://h:1/2".into()]),
            Ok(RedisTarget::Single("redis://h:1/2".into()))
        );
        assert_eq!(
            RedisTarget::parse(&["redis+cluster://u:p@a:1,b:2".into()]),
            Ok(RedisTarget::Cluster(vec![
                "redis://u:p@a:1".into(),
                "redis://u:p@b:2".into()
            ]))
        );
        assert_eq!(
            RedisTarget::parse(&["redis://a:1".into(), "redis://b:2".into()]),
            Ok(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        assert!(RedisTarget::parse(&["http://x".into()]).is_err());
        assert!(RedisTarget::parse(&[]).is_err());
    }
}
