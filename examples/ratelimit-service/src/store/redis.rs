//! The Redis / Redis Cluster store: every check or charge is one `EVALSHA` of `limiter.lua`
//! (reloaded by the client on `NOSCRIPT`), connections reconnect by themselves.
//!
//! A counter's meters share one hash, whose key carries a hash tag, so in a cluster each
//! counter is atomic. A request that spans counters in several slots is sent as one script
//! per counter: a check whose reservation fails on one counter refunds the others (a brief
//! over-denial is possible under contention, an overshoot is not), and each counter
//! remembers report ids on its own, so a retried report is applied exactly once per counter.

use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use tokio::sync::OnceCell;

use super::model::{Applied, CheckOutcome, Crossing, Settlement, StoreError};
use super::sources::{self, Dedup, Mark};
use crate::clock::system_ms;
use crate::counter::Plan;
use crate::meter::{Meter, State, Status};
use wire::SeqId;
use wire::{Amount, Trim};

/// The store's epoch (see [`RedisStore::epoch`]).
const EPOCH_KEY: &str = "ltr:epoch";

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
    adjust: Script,
    timeout: Duration,
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
            adjust: Script::new(include_str!("adjust.lua")),
            timeout,
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

    pub(crate) async fn run_script(
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
    /// looked up in the ring whose keys follow the counters'; `trim`: a check's; `alerting`: a
    /// report's settlement, which raises the plans' alerts.
    #[allow(clippy::too_many_arguments)]
    fn args(
        mode: &str,
        now: Option<i64>,
        amount: Amount,
        refund: (Amount, Option<i64>),
        dedup: Option<u64>,
        trim: Option<&Trim>,
        plans: &[Plan],
        alerting: bool,
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
            trim.map_or(-1, |t| t.min as i64).to_string(),
            trim.map_or(0, |t| t.fixed.tokens).to_string(),
            trim.map_or(0, |t| t.fixed.micros).to_string(),
        ];
        for plan in plans {
            args.push(plan.meters.len().to_string());
            args.push(u8::from(plan.shadow).to_string());
            let alerts: &[wire::Threshold] = if alerting { &plan.alerts } else { &[] };
            args.push(alerts.len().to_string());
            args.extend(alerts.iter().map(|t| t.permille().to_string()));
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
                // The spend each threshold is reached at, in integers (the script's numbers
                // are doubles, exact to 2^53, beyond any amount).
                let budget = i128::from(m.limit());
                args.extend(alerts.iter().map(|t| {
                    let at = (budget * i128::from(t.permille()) + 999) / 1000;
                    at.min(i128::from(i64::MAX)).to_string()
                }));
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
        trim: Option<Trim>,
        now: Option<i64>,
    ) -> Result<CheckOutcome, StoreError> {
        let groups = self.groups(plans);
        let calls = groups.iter().map(|group| {
            let keys = group.iter().map(|p| p.id.storage_key()).collect();
            self.run(
                keys,
                Self::args(
                    "check",
                    now,
                    reserve,
                    (Amount::ZERO, None),
                    None,
                    trim.as_ref(),
                    group,
                    false,
                ),
            )
        });
        let answers = join_all(calls).await;
        let mut allowed = true;
        let mut at_ms = None;
        // What each group took: the reserve, its own grant, or nothing.
        let mut taken = Vec::with_capacity(groups.len());
        let mut statuses = Vec::with_capacity(plans.len());
        let mut shadow_denied = Vec::with_capacity(plans.len());
        // Where each group's statuses start.
        let mut starts = Vec::with_capacity(groups.len());
        for (group, answer) in groups.iter().zip(&answers) {
            starts.push(statuses.len());
            let Ok(answer) = answer else {
                taken.push(Amount::ZERO);
                shadow_denied.extend(group.iter().map(|_| false));
                continue;
            };
            let admitted = answer.first() == Some(&1);
            allowed &= admitted;
            at_ms = at_ms.or(answer.get(1).copied());
            let granted = match answer.get(2..4) {
                Some(&[t, m]) if t >= 0 => Some(Amount::new(t as u64, m.max(0) as u64)),
                _ => None,
            };
            taken.push(if admitted {
                granted.unwrap_or(reserve)
            } else {
                Amount::ZERO
            });
            let mut figures = answer.iter().skip(4);
            for plan in group.iter() {
                let per_meter: Vec<Status> = plan
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
            shadow_denied.extend(group.iter().map(|_| figures.next() == Some(&1)));
        }
        let at_ms = at_ms.or(now).unwrap_or_else(system_ms);
        if let Some(redis_now) = replan(&answers) {
            self.refund(&groups, &taken, at_ms, now).await;
            return Err(StoreError::Replan(redis_now));
        }
        let failed = answers
            .iter()
            .find_map(|a| a.as_ref().err().map(|e| e.to_string()));
        if let Some(error) = failed {
            self.refund(&groups, &taken, at_ms, now).await;
            return Err(unavailable(error));
        }
        if !allowed {
            self.refund(&groups, &taken, at_ms, now).await;
        }
        // Trimmed (in a cluster, each counter on its own): all keep the smallest grant.
        let granted = match trim {
            Some(trim) if allowed && taken.iter().any(|t| *t != reserve) => {
                let tokens = taken.iter().map(|t| t.tokens).min().unwrap_or(0);
                let grant = Amount::new(tokens, trim.cost(reserve, tokens));
                let beyond: Vec<Amount> = taken.iter().map(|t| t.less(grant)).collect();
                self.refund(&groups, &beyond, at_ms, now).await;
                // The statuses say what is left after the refunds.
                for ((group, start), extra) in groups.iter().zip(&starts).zip(&beyond) {
                    let group_statuses = statuses.iter_mut().skip(*start).take(group.len());
                    for (plan, st) in group.iter().zip(group_statuses) {
                        for (m, status) in plan.meters.iter().zip(st.iter_mut()) {
                            let back = crate::meter::counted(*extra, m.money());
                            status.remaining =
                                status.remaining.saturating_add(back).min(status.limit);
                        }
                    }
                }
                Some(grant)
            }
            _ => None,
        };
        Ok(CheckOutcome {
            allowed,
            statuses,
            at_ms,
            granted,
            shadow_denied,
        })
    }

    /// Gives back what each group took (`amounts`, in group order), when the request as a
    /// whole did not keep it (denied, failed, to be planned again, or trimmed further).
    async fn refund(&self, groups: &[&[Plan]], amounts: &[Amount], at_ms: i64, now: Option<i64>) {
        for (group, amount) in groups.iter().zip(amounts) {
            if amount.is_zero() {
                continue;
            }
            let keys = group.iter().map(|p| p.id.storage_key()).collect();
            let args = Self::args(
                "settle",
                now,
                Amount::ZERO,
                (*amount, Some(at_ms)),
                None,
                None,
                group,
                false,
            );
            if let Err(e) = self.run(keys, args).await {
                tracing::warn!("could not refund a reservation: {e}");
            }
        }
    }

    /// Applies a settlement (see [`super::Store::settle_report`]).
    pub async fn settle(
        &self,
        id: Option<SeqId>,
        plans: &[Plan],
        settlement: &Settlement,
        now: Option<i64>,
        mut raised: Option<&mut Vec<Crossing>>,
    ) -> Result<Applied, StoreError> {
        let alerting = raised.is_some();
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
                None,
                group,
                alerting,
            );
            self.run(keys, args)
        });
        let answers = join_all(calls).await;
        // The alerts of every group that settled, whatever the others did: a group that settled
        // stays settled (its id is marked, its alert marks written), so a retry is a duplicate
        // there and would never raise them.
        let mut first_plan = 0;
        for (group, answer) in groups.iter().zip(&answers) {
            if let (Some(raised), Ok(answer)) = (raised.as_deref_mut(), answer) {
                if answer.first() == Some(&1) {
                    raised.extend(Self::crossings(group, answer, first_plan));
                }
            }
            first_plan += group.len();
        }
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

    /// The thresholds a settle answer says its group's meters reached: per meter that raised,
    /// `counter, meter, highest raised before, highest now, spend` (1-based indices).
    fn crossings(group: &[Plan], answer: &[i64], first_plan: usize) -> Vec<Crossing> {
        let at = answer.get(1).copied().unwrap_or(0);
        let mut out = Vec::new();
        for raised in answer.get(2..).unwrap_or_default().chunks_exact(5) {
            let &[c, i, before, highest, used] = raised else {
                continue;
            };
            let (Ok(p), Ok(i)) = (usize::try_from(c - 1), usize::try_from(i - 1)) else {
                continue;
            };
            let Some((plan, meter)) = group.get(p).and_then(|pl| Some((pl, pl.meters.get(i)?)))
            else {
                continue;
            };
            let thresholds: Vec<wire::Threshold> = plan
                .alerts
                .iter()
                .copied()
                .filter(|t| (before + 1..=highest).contains(&i64::from(t.permille())))
                .collect();
            if let (false, Some(window)) = (thresholds.is_empty(), meter.alert_window(at)) {
                out.push(Crossing {
                    plan: first_plan + p,
                    meter: i,
                    thresholds,
                    used,
                    budget: meter.limit(),
                    window,
                });
            }
        }
        out
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

    /// One command, with the store's deadline.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
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

    pub(crate) async fn query_pipe(&self, pipe: redis::Pipeline) -> Result<(), StoreError> {
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

    /// `ltr:epoch`, made (a random value) when Redis does not hold it: at first use, and after
    /// Redis lost its data.
    pub async fn epoch(&self) -> Result<String, StoreError> {
        let fresh = format!(
            "{:016x}",
            crate::counter::fnv(&system_ms().to_le_bytes()) ^ std::process::id() as u64
        );
        let mut set = redis::cmd("SET");
        set.arg(EPOCH_KEY).arg(&fresh).arg("NX");
        let _: Option<String> = self.query(set).await?;
        let mut get = redis::cmd("GET");
        get.arg(EPOCH_KEY);
        let epoch: Option<String> = self.query(get).await?;
        Ok(epoch.unwrap_or(fresh))
    }

    /// Whether the marker [`RedisStore::claim_restore`] sets is there.
    pub async fn restore_marked(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(restore_marker(key, field, start_ms));
        let n: i64 = self.query(exists).await?;
        Ok(n > 0)
    }

    pub async fn unclaim_restore(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
    ) -> Result<(), StoreError> {
        let mut del = redis::cmd("DEL");
        del.arg(restore_marker(key, field, start_ms));
        let _: i64 = self.query(del).await?;
        Ok(())
    }

    /// A marker beside the counter (its slot: lost with it), set once per period.
    pub async fn claim_restore(
        &self,
        key: &str,
        field: &str,
        start_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(restore_marker(key, field, start_ms))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1));
        let claimed: Option<String> = self.query(set).await?;
        Ok(claimed.is_some())
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

/// The key marking that a counter's period is known to this Redis's life: beside the counter,
/// in its hash tag's slot.
fn restore_marker(key: &str, field: &str, start_ms: i64) -> String {
    format!("{key}:restored:{field}:{start_ms}")
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
