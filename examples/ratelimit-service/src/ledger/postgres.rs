//! The ledger's PostgreSQL side: the connection (made on first use, dropped after an error),
//! the schema's migrations, one transaction per batch, and the queries.

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::{Client, Config, NoTls};

use super::report::{SpendQuery, SpendRow};
use super::rows::{aggregate, distinct, now_ms, Entry, LedgerError, RowKey, Sums};

/// The schema, one step per version, applied in order and recorded in
/// `ltr_schema_migrations`; a step never changes once shipped.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE ltr_spend (
         limit_name  text    NOT NULL,
         key_value   text    NOT NULL,
         shared      boolean NOT NULL,
         bucket_ms   bigint  NOT NULL,
         model       text    NOT NULL,
         currency    text    NOT NULL,
         requests    bigint  NOT NULL,
         tokens      bigint  NOT NULL,
         cost_micros bigint  NOT NULL,
         PRIMARY KEY (limit_name, key_value, shared, bucket_ms, model, currency)
     );
     CREATE INDEX ltr_spend_bucket ON ltr_spend (bucket_ms);
     CREATE TABLE ltr_ledger_ids (
         id        text   PRIMARY KEY,
         added_ms  bigint NOT NULL
     );
     CREATE INDEX ltr_ledger_ids_added ON ltr_ledger_ids (added_ms);",
)];

/// Sums as bigints, held at the largest (a sum past it would fail the query).
const SUMS: &str = "LEAST(coalesce(sum(requests), 0), 9223372036854775807)::bigint,
     LEAST(coalesce(sum(tokens), 0), 9223372036854775807)::bigint,
     LEAST(coalesce(sum(cost_micros), 0), 9223372036854775807)::bigint";

/// The most rows one spend report answers (narrow the range or the grouping for more).
pub const MAX_ROWS: usize = 100_000;

/// Serialises migrations across replicas starting at once (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x6c74_725f_6c65_6467;

pub struct Database {
    config: Config,
    client: Option<Client>,
}

fn unreachable(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Unreachable(e.to_string())
}

/// A database error: refused (SQL states of class 22, data exceptions, and 23, constraint
/// violations: the same write would fail again) or the database unreachable.
fn failed(e: tokio_postgres::Error) -> LedgerError {
    let refused = e
        .as_db_error()
        .is_some_and(|d| matches!(&d.code().code()[..2], "22" | "23"));
    if refused {
        LedgerError::Refused(e.to_string())
    } else {
        unreachable(e)
    }
}

impl Database {
    pub fn new(url: &str) -> Result<Database, LedgerError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| LedgerError::BadQuery(format!("--ledger: not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        Ok(Database {
            config,
            client: None,
        })
    }

    /// Forgets the connection: the next use connects again.
    pub fn reset(&mut self) {
        self.client = None;
    }

    async fn client(&mut self) -> Result<&mut Client, LedgerError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let (mut client, connection) = self.config.connect(NoTls).await.map_err(unreachable)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("spend ledger connection ended: {e}");
                }
            });
            migrate(&mut client).await?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| unreachable("no connection"))
    }

    /// Writes a batch in one transaction: only entries whose ids it has not seen add their
    /// rows. `Ok(entries skipped as already written)`.
    pub async fn write(
        &mut self,
        batch: &[Entry],
        folded: Option<&(String, BTreeMap<RowKey, Sums>)>,
    ) -> Result<usize, LedgerError> {
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(unreachable)?;
        let entries = distinct(batch);
        let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        if let Some((id, _)) = folded {
            ids.push(id);
        }
        // In one order everywhere: two replicas adding overlapping ids never deadlock.
        ids.sort_unstable();
        let now = now_ms();
        let fresh: HashSet<String> = tx
            .query(
                "INSERT INTO ltr_ledger_ids (id, added_ms)
                 SELECT id, $2 FROM unnest($1::text[]) AS id
                 ON CONFLICT DO NOTHING RETURNING id",
                &[&ids, &now],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let new = entries.iter().copied().filter(|e| fresh.contains(&e.id));
        let mut sums = aggregate(new);
        if let Some((_, folded)) = folded.filter(|(id, _)| fresh.contains(id)) {
            for (key, s) in folded {
                sums.entry(key.clone()).or_default().add(*s);
            }
        }
        upsert(&tx, &sums).await?;
        tx.commit().await.map_err(unreachable)?;
        Ok(batch.len() - entries.iter().filter(|e| fresh.contains(&e.id)).count())
    }

    pub async fn spend(&mut self, q: &SpendQuery) -> Result<Vec<SpendRow>, LedgerError> {
        let client = self.client().await?;
        let columns = q.columns();
        let select = if columns.is_empty() {
            String::new()
        } else {
            format!("{}, ", columns.join(", "))
        };
        let sql = format!(
            "SELECT {select}currency, {} FROM ltr_spend WHERE bucket_ms >= $1 AND bucket_ms < $2
             GROUP BY {select}currency ORDER BY {select}currency LIMIT {}",
            SUMS,
            MAX_ROWS + 1
        );
        let rows = client
            .query(&sql, &[&q.from_ms, &q.to_ms])
            .await
            .map_err(unreachable)?;
        if rows.len() > MAX_ROWS {
            return Err(LedgerError::BadQuery(format!(
                "more than {MAX_ROWS} rows: narrow the range (from, to) or group_by"
            )));
        }
        Ok(rows
            .iter()
            .map(|r| {
                let n = columns.len();
                let text = |i: usize| r.get::<_, String>(i);
                let mut row = SpendRow::default();
                for (i, c) in columns.iter().enumerate() {
                    match *c {
                        "limit_name" => row.limit = Some(text(i)),
                        "key_value" => row.value = Some(text(i)),
                        "model" => row.model = Some(text(i)),
                        _ => {}
                    }
                }
                row.currency = text(n);
                row.requests = r.get(n + 1);
                row.tokens = r.get(n + 2);
                row.cost_micros = r.get(n + 3);
                row
            })
            .collect())
    }

    pub async fn spent_since(
        &mut self,
        limit: &str,
        value: &str,
        shared: bool,
        since_ms: i64,
    ) -> Result<Sums, LedgerError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT {SUMS} FROM ltr_spend
                 WHERE limit_name = $1 AND key_value = $2 AND shared = $3 AND bucket_ms >= $4"
                ),
                &[&limit, &value, &shared, &since_ms],
            )
            .await
            .map_err(unreachable)?;
        Ok(Sums {
            requests: row.get(0),
            tokens: row.get(1),
            cost_micros: row.get(2),
        })
    }

    /// Forgets report ids added before `before_ms` (their reports are long settled), at most
    /// 50,000 per call (the writer waits for it).
    pub async fn prune(&mut self, before_ms: i64) -> Result<(), LedgerError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM ltr_ledger_ids WHERE id IN
                     (SELECT id FROM ltr_ledger_ids WHERE added_ms < $1 LIMIT 50000)",
                &[&before_ms],
            )
            .await
            .map_err(unreachable)?;
        Ok(())
    }
}

/// Adds `sums` to their rows, in key order (two replicas writing the same rows take their
/// locks in one order, so they never deadlock).
async fn upsert(
    tx: &tokio_postgres::Transaction<'_>,
    sums: &BTreeMap<RowKey, Sums>,
) -> Result<(), LedgerError> {
    if sums.is_empty() {
        return Ok(());
    }
    let keys: Vec<&RowKey> = sums.keys().collect();
    let limits: Vec<&str> = keys.iter().map(|k| k.limit.as_str()).collect();
    let values: Vec<&str> = keys.iter().map(|k| k.value.as_str()).collect();
    let shared: Vec<bool> = keys.iter().map(|k| k.shared).collect();
    let buckets: Vec<i64> = keys.iter().map(|k| k.bucket_ms).collect();
    let models: Vec<&str> = keys.iter().map(|k| k.model.as_str()).collect();
    let currencies: Vec<&str> = keys.iter().map(|k| k.currency.as_str()).collect();
    let requests: Vec<i64> = sums.values().map(|s| s.requests).collect();
    let tokens: Vec<i64> = sums.values().map(|s| s.tokens).collect();
    let costs: Vec<i64> = sums.values().map(|s| s.cost_micros).collect();
    tx.execute(
        "INSERT INTO ltr_spend AS s
             (limit_name, key_value, shared, bucket_ms, model, currency, requests, tokens, cost_micros)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::bigint[], $5::text[],
                              $6::text[], $7::bigint[], $8::bigint[], $9::bigint[])
         ON CONFLICT (limit_name, key_value, shared, bucket_ms, model, currency) DO UPDATE SET
             requests = LEAST(s.requests::numeric + EXCLUDED.requests, 9223372036854775807)::bigint,
             tokens = LEAST(s.tokens::numeric + EXCLUDED.tokens, 9223372036854775807)::bigint,
             cost_micros = LEAST(s.cost_micros::numeric + EXCLUDED.cost_micros, 9223372036854775807)::bigint",
        &[
            &limits,
            &values,
            &shared,
            &buckets,
            &models,
            &currencies,
            &requests,
            &tokens,
            &costs,
        ],
    )
    .await
    .map_err(failed)?;
    Ok(())
}

/// Applies the migrations this database lacks, under a lock that replicas share.
async fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    let tx = client.transaction().await.map_err(unreachable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(unreachable)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ltr_schema_migrations (
             version integer PRIMARY KEY,
             applied_ms bigint NOT NULL
         )",
    )
    .await
    .map_err(unreachable)?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM ltr_schema_migrations", &[])
        .await
        .map_err(unreachable)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        tx.batch_execute(sql).await.map_err(unreachable)?;
        tx.execute(
            "INSERT INTO ltr_schema_migrations (version, applied_ms) VALUES ($1, $2)",
            &[version, &now_ms()],
        )
        .await
        .map_err(unreachable)?;
        tracing::info!("spend ledger: schema migrated to version {version}");
    }
    tx.commit().await.map_err(unreachable)
}
