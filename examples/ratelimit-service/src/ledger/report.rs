//! `GET /v1/spend`: the ledger's sums over a time range, grouped as finance asks, as JSON or
//! CSV.

use serde::Serialize;

use super::rows::{bucket, BUCKET_MS};

/// What a spend report can be grouped by.
const GROUPS: &[(&str, &str)] = &[
    ("limit", "limit_name"),
    ("value", "key_value"),
    ("model", "model"),
];

/// A spend report's range (`[from, to)`, whole quarter hours) and grouping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    /// Of `limit`, `value`, `model`, in the order asked; rows are always apart by currency.
    pub group_by: Vec<&'static str>,
}

impl SpendQuery {
    /// Reads `from`, `to` (RFC 3339 times, `YYYY-MM-DD` dates in UTC, or ms since the epoch)
    /// and `group_by`. `from` defaults to the start of the current month (UTC), `to` to the
    /// end of the current quarter hour, `group_by` to `limit,value,model`.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        group_by: Option<&str>,
        now_ms: i64,
    ) -> Result<SpendQuery, String> {
        let from_ms = match from {
            Some(t) => instant(t).map_err(|e| format!("from: {e}"))?,
            None => month_start_utc(now_ms),
        };
        let to_ms = match to {
            Some(t) => instant(t).map_err(|e| format!("to: {e}"))?,
            // Now included: its quarter hour is part of the range.
            None => now_ms.saturating_add(1),
        };
        // Rounded out to whole buckets: `from` down, `to` up.
        let from_ms = bucket(from_ms);
        let to_ms = bucket(to_ms.saturating_add(BUCKET_MS - 1));
        if to_ms <= from_ms {
            return Err("to must be later than from".into());
        }
        let mut groups = Vec::new();
        for g in group_by
            .unwrap_or("limit,value,model")
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
        {
            let Some((name, _)) = GROUPS.iter().find(|(n, _)| *n == g) else {
                return Err(format!(
                    "group_by: `{}` is not one of limit, value, model",
                    g.escape_debug()
                ));
            };
            if !groups.contains(name) {
                groups.push(*name);
            }
        }
        Ok(SpendQuery {
            from_ms,
            to_ms,
            group_by: groups,
        })
    }

    /// The table's columns for `group_by`.
    pub(super) fn columns(&self) -> Vec<&'static str> {
        self.group_by
            .iter()
            .filter_map(|g| GROUPS.iter().find(|(n, _)| n == g).map(|(_, c)| *c))
            .collect()
    }
}

/// One group's sums.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SpendRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `""` for limits in tokens.
    pub currency: String,
    pub requests: i64,
    pub tokens: i64,
    pub cost_micros: i64,
}

fn instant(t: &str) -> Result<i64, String> {
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(ts) = t.parse::<jiff::Timestamp>() {
        return Ok(ts.as_millisecond());
    }
    if let Ok(date) = t.parse::<jiff::civil::Date>() {
        let zoned = date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(|e| e.to_string())?;
        return Ok(zoned.timestamp().as_millisecond());
    }
    Err(format!(
        "`{}` is not an RFC 3339 time, a YYYY-MM-DD date or ms since the epoch",
        t.escape_debug()
    ))
}

fn month_start_utc(now_ms: i64) -> i64 {
    let tz = jiff::tz::TimeZone::UTC;
    crate::calendar::bounds(wire::Period::Month, &tz, now_ms).map_or(0, |(start, _)| start)
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

/// The report as JSON: the range, the grouping, the rows, and totals per currency.
pub fn json(q: &SpendQuery, rows: &[SpendRow]) -> serde_json::Value {
    let mut totals: std::collections::BTreeMap<&str, (i64, i64, i64)> = Default::default();
    for r in rows {
        let t = totals.entry(&r.currency).or_default();
        t.0 = t.0.saturating_add(r.requests);
        t.1 = t.1.saturating_add(r.tokens);
        t.2 = t.2.saturating_add(r.cost_micros);
    }
    let money = |micros: i64| wire::format_micros(micros.max(0) as u64);
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if !r.currency.is_empty() {
                v["cost"] = money(r.cost_micros).into();
            }
            v
        })
        .collect();
    let totals: Vec<serde_json::Value> = totals
        .into_iter()
        .map(|(currency, (requests, tokens, micros))| {
            let mut v = serde_json::json!({"currency": currency, "requests": requests, "tokens": tokens, "cost_micros": micros});
            if !currency.is_empty() {
                v["cost"] = money(micros).into();
            }
            v
        })
        .collect();
    serde_json::json!({
        "from": rfc3339(q.from_ms),
        "to": rfc3339(q.to_ms),
        "group_by": q.group_by,
        "rows": rows,
        "totals": totals,
    })
}

/// The report as CSV (RFC 4180): a header, then a line per row. Every text field is quoted,
/// and one a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, carriage return
/// first) starts with `'`: key values are chosen by clients.
pub fn csv(q: &SpendQuery, rows: &[SpendRow]) -> String {
    let mut out = String::new();
    let mut header: Vec<&str> = q.group_by.clone();
    header.extend(["currency", "requests", "tokens", "cost"]);
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    for r in rows {
        let mut fields: Vec<String> = Vec::new();
        for g in &q.group_by {
            let text = match *g {
                "limit" => r.limit.as_deref(),
                "value" => r.value.as_deref(),
                _ => r.model.as_deref(),
            };
            fields.push(quoted(text.unwrap_or_default()));
        }
        fields.push(quoted(&r.currency));
        fields.push(r.requests.to_string());
        fields.push(r.tokens.to_string());
        fields.push(if r.currency.is_empty() {
            String::new()
        } else {
            wire::format_micros(r.cost_micros.max(0) as u64)
        });
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

fn quoted(text: &str) -> String {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    format!(
        "\"{}{}\"",
        if formula { "'" } else { "" },
        text.replace('"', "\"\"")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ranges_round_out_to_quarter_hours_and_default_to_the_month() {
        let now = 1_764_590_400_000 + 3 * 86_400_000 + 1_234_567; // 2025-12-04T…
        let q = SpendQuery::parse(None, None, None, now).unwrap();
        assert_eq!(q.from_ms, 1_764_547_200_000, "2025-12-01T00:00Z");
        assert!(q.to_ms >= now && q.to_ms - now < BUCKET_MS);
        assert_eq!(q.group_by, ["limit", "value", "model"]);
        let q = SpendQuery::parse(
            Some("2025-12-01T10:07:00Z"),
            Some("2025-12-02"),
            Some("model, limit"),
            now,
        )
        .unwrap();
        assert_eq!(q.from_ms, 1_764_583_200_000, "10:00");
        assert_eq!(q.to_ms, 1_764_633_600_000);
        assert_eq!(q.columns(), ["model", "limit_name"]);
        assert!(SpendQuery::parse(None, None, Some("user"), now).is_err());
        assert!(SpendQuery::parse(Some("yesterday"), None, None, now).is_err());
        assert!(SpendQuery::parse(Some("2025-12-02"), Some("2025-12-01"), None, now).is_err());
    }

    #[test]
    fn csv_quotes_text_and_defuses_formulas() {
        let q = SpendQuery::parse(Some("0"), Some("1"), Some("value"), 0).unwrap();
        let rows = [SpendRow {
            value: Some("=HYPERLINK(\"x\")".into()),
            currency: "USD".into(),
            requests: 2,
            tokens: 30,
            cost_micros: 1_500_000,
            ..SpendRow::default()
        }];
        assert_eq!(
            csv(&q, &rows),
            "value,currency,requests,tokens,cost\r\n\"'=HYPERLINK(\"\"x\"\")\",\"USD\",2,30,1.50\r\n"
        );
    }
}
