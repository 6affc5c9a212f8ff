//! The one wire contract between the llm-token-ratelimit plugin and its rate-limit service.
//!
//! Both sides build and read these types, so a request the plugin can build is, by
//! construction, one the service understands; the bounds below are checked by the service
//! ([`validate_check`], [`validate_reports`]) and respected by the plugin when it loads its
//! configuration and clamps what clients send. Protocol v1 is JSON over HTTP:
//! `POST /v1/check` and `POST /v1/report`; the ASM endpoints are here too.

pub mod rls;

use serde::{Deserialize, Deserializer, Serialize};

/// The most descriptors (limits that apply to one request) in one check or report.
pub const MAX_DESCRIPTORS: usize = 64;
/// The most rates one descriptor may carry.
pub const MAX_RATES: usize = 16;
/// The longest limit name or key value, in bytes.
pub const MAX_TEXT: usize = 4096;
/// The most reports in one `/v1/report` call.
pub const MAX_REPORTS: usize = 1000;
/// The largest token figure anywhere (budgets, reserves, charges): far above any real budget,
/// far below where integer arithmetic in the stores could overflow.
pub const MAX_TOKENS: u64 = 1_000_000_000_000_000;
/// The longest window, in seconds.
pub const MAX_WINDOW_S: u64 = 366 * 86_400;
/// The longest request or report id, in bytes.
pub const MAX_ID: usize = 256;
/// The largest request body the service reads; the plugin's report batches stay well below.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The longest IANA time zone name a calendar rate may carry.
pub const MAX_ZONE: usize = 64;

/// One budget: `tokens` per `window_s` seconds, or per calendar period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rate {
    pub tokens: u64,
    /// The window; for a calendar rate, the period's longest length (a month: 31 days).
    pub window_s: u64,
    /// Counts in calendar periods (the current month, week, day or hour in a time zone),
    /// resetting at each period's start, instead of a rolling window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<Calendar>,
}

/// A calendar period in an IANA time zone; the service does the calendar arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Calendar {
    pub period: Period,
    /// An IANA name (`Asia/Shanghai`, `UTC`).
    pub timezone: String,
}

/// A calendar period; weeks start on Monday (ISO 8601).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl Period {
    /// The longest a period lasts, in seconds (a DST day is 25 hours).
    pub fn longest_s(self) -> u64 {
        match self {
            Period::Hour => 3_600,
            Period::Day => 25 * 3_600,
            Period::Week => 7 * 86_400 + 3_600,
            Period::Month => 31 * 86_400 + 3_600,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// What one limit asks of the service for one request: a counter (`limit`, `value`) and the
/// rates it is held to. No rates: the service's own rules decide (service-owned limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Descriptor {
    pub limit: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<Rate>,
    /// Every value matching one `shared` rule spends one counter; sent so the service keys it
    /// apart from a client whose own key happens to equal the rule's pattern.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared: bool,
    /// Set when the limit counts money: its rates and every amount charged to it are micro
    /// units (millionths) of this currency (an ISO 4217 code such as `USD`), not tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `POST /v1/check`. Generic over how the descriptors are held, so the plugin serialises a
/// borrowed slice and the service reads an owned vector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest<D = Vec<Descriptor>> {
    pub descriptors: D,
    /// Tokens taken from every descriptor on admission.
    #[serde(default)]
    pub reserve: u64,
    /// Micro units taken from every descriptor that counts money, on admission.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reserve_cost: u64,
    /// The id the request's report will carry (`<source>-<sequence>`): lets a later release
    /// find out whether this check's reservation was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The state of one rate of one descriptor after a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitStatus {
    pub limit: String,
    pub value: String,
    pub tokens: u64,
    pub window_s: u64,
    /// Clamped to `[0, tokens]`: a counter in debt reports 0.
    #[serde(deserialize_with = "non_negative")]
    pub remaining: u64,
    pub reset_ms: u64,
    /// A limit that counts money: `tokens` and `remaining` are micro units of this currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// A calendar rate: its period, and when the current one ends (RFC 3339, in its zone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

/// The answer to a check: always HTTP 200 when there is a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    pub allowed: bool,
    #[serde(default)]
    pub limits: Vec<LimitStatus>,
    #[serde(default)]
    pub retry_after_ms: u64,
    #[serde(default)]
    pub denied_by: Option<String>,
    /// When the reservation was taken, on the service's clock (ms since the epoch). The report
    /// echoes it so a refund is settled in the window that holds the reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_at_ms: Option<u64>,
}

/// The provider's usage, normalised; carried for logs and audits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageFigures {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt, read from the provider's cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cached_prompt_tokens: u64,
    /// Of the completion, spent on reasoning.
    #[serde(skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one request (or, merged, several) spent. The service charges `tokens − reserved`:
/// an excess now, a refund in the window of `reserved_at_ms`, never below zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report<D = Vec<Descriptor>> {
    /// Unique per report, stable across retries (`<source>-<sequence>`).
    pub id: String,
    pub descriptors: D,
    pub tokens: u64,
    #[serde(default)]
    pub reserved: u64,
    /// What the request cost, in micro units, charged to the descriptors that count money.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reserved_cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_at_ms: Option<u64>,
    /// The id of a check whose answer the plugin never saw (the stream ended during the
    /// check, or the check timed out): `reserved` counts only if the service took that check's
    /// reservation, and is released at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageFigures>,
}

/// `POST /v1/report`; generic like [`CheckRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest<R = Report> {
    pub reports: Vec<R>,
}

/// The answer to a report call: totals, and what became of each report, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportResponse {
    pub accepted: usize,
    pub duplicates: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<ReportResult>,
}

/// What became of one report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportResult {
    pub outcome: Outcome,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ReportResult {
    pub fn of(outcome: Outcome) -> ReportResult {
        ReportResult {
            outcome,
            error: None,
        }
    }

    pub fn rejected(why: impl Into<String>) -> ReportResult {
        ReportResult {
            outcome: Outcome::Rejected,
            error: Some(why.into()),
        }
    }
}

/// The fate of one report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Charged now.
    #[default]
    Applied,
    /// Charged before (a retry): nothing done.
    Duplicate,
    /// Can never be applied (malformed, or an id outside its source's window): drop it.
    Rejected,
    /// The store failed before this report: send it again, with the same id.
    Retry,
}

/// How far behind the newest report id of a source the service still recognises ids: a
/// plugin never has a report outstanding (waiting for an answer or a retry) older than this
/// many ids before the newest it has sent, so a retry is always recognised.
pub const REPORT_WINDOW: u64 = 4096;

/// `GET /ratelimit` answer, as the ASM example service gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsmCheckResponse {
    pub allow: bool,
    #[serde(default)]
    pub description: String,
}

/// `POST /update_ratelimit_record` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsmUpdate<K = Vec<String>> {
    pub ratelimit_keys: K,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// What the service charges (the plugin sends its figure per `usage.count`).
    #[serde(default)]
    pub total_tokens: u64,
}

/// Micro units (millionths) of a currency as a decimal with at least two decimals:
/// `20000000` → `"20.00"`, `75000` → `"0.075"`. The plugin's denials and headers and the
/// service's `/v1/quota` write money so.
pub fn format_micros(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let mut fraction = format!("{:06}", micros % 1_000_000);
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    format!("{whole}.{fraction}")
}

/// Reads any JSON integer, clamping negatives to 0 (a counter in debt is "nothing left").
fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        U(u64),
        I(i64),
    }
    Ok(match Int::deserialize(d)? {
        Int::U(u) => u,
        Int::I(i) => i.max(0) as u64,
    })
}

/// The largest sequence number of an id.
pub const MAX_SEQ: u64 = 1 << 53;

/// A request id as the plugin makes them: a per-VM random source and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId {
    pub source: u64,
    pub seq: u64,
}

impl SeqId {
    /// `<16 hex digits>-<decimal>`.
    pub fn format(&self) -> String {
        format!("{:016x}-{}", self.source, self.seq)
    }

    /// Reads an id in [`SeqId::format`]'s form; other ids (from other clients) are `None`.
    pub fn parse(id: &str) -> Option<SeqId> {
        let (source, seq) = id.split_once('-')?;
        if source.len() != 16 || seq.is_empty() || seq.len() > 20 {
            return None;
        }
        if !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq: u64 = seq.parse().ok()?;
        // Exact in every store (Lua numbers are doubles).
        if seq > MAX_SEQ {
            return None;
        }
        Some(SeqId {
            source: u64::from_str_radix(source, 16).ok()?,
            seq,
        })
    }
}

/// A request the service refuses (HTTP 400), with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn validate_descriptors(ds: &[Descriptor], at: &str) -> Result<(), BadRequest> {
    if ds.len() > MAX_DESCRIPTORS {
        return Err(BadRequest(format!(
            "{at}descriptors: more than {MAX_DESCRIPTORS}"
        )));
    }
    for (i, d) in ds.iter().enumerate() {
        let here = format!("{at}descriptors[{i}]");
        if d.limit.len() > MAX_TEXT || d.value.len() > MAX_TEXT {
            return Err(BadRequest(format!(
                "{here}: limit and value must be at most {MAX_TEXT} bytes"
            )));
        }
        if d.rates.len() > MAX_RATES {
            return Err(BadRequest(format!("{here}.rates: more than {MAX_RATES}")));
        }
        if let Some(c) = &d.currency {
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(BadRequest(format!(
                    "{here}.currency must be three capital letters (ISO 4217)"
                )));
            }
        }
        for (j, r) in d.rates.iter().enumerate() {
            if let Some(c) = &r.calendar {
                if c.timezone.is_empty() || c.timezone.len() > MAX_ZONE {
                    return Err(BadRequest(format!(
                        "{here}.rates[{j}].calendar.timezone must be 1 to {MAX_ZONE} bytes"
                    )));
                }
            }
            if r.tokens == 0 || r.tokens > MAX_TOKENS {
                return Err(BadRequest(format!(
                    "{here}.rates[{j}].tokens must be between 1 and {MAX_TOKENS}"
                )));
            }
            if r.window_s == 0 || r.window_s > MAX_WINDOW_S {
                return Err(BadRequest(format!(
                    "{here}.rates[{j}].window_s must be between 1 and {MAX_WINDOW_S}"
                )));
            }
        }
    }
    Ok(())
}

fn validate_id(id: &str, at: &str) -> Result<(), BadRequest> {
    if id.is_empty() || id.len() > MAX_ID {
        return Err(BadRequest(format!("{at}id must be 1 to {MAX_ID} bytes")));
    }
    Ok(())
}

pub fn validate_check(req: &CheckRequest) -> Result<(), BadRequest> {
    if req.reserve > MAX_TOKENS || req.reserve_cost > MAX_TOKENS {
        return Err(BadRequest(format!(
            "reserve and reserve_cost must be at most {MAX_TOKENS}"
        )));
    }
    if let Some(id) = &req.id {
        validate_id(id, "")?;
    }
    validate_descriptors(&req.descriptors, "")
}

/// The batch as a whole; each report is checked on its own ([`validate_report`]), so one bad
/// report is refused alone.
pub fn validate_reports(req: &ReportRequest) -> Result<(), BadRequest> {
    if req.reports.len() > MAX_REPORTS {
        return Err(BadRequest(format!(
            "reports: more than {MAX_REPORTS} in one batch"
        )));
    }
    Ok(())
}

pub fn validate_report(r: &Report, at: &str) -> Result<(), BadRequest> {
    validate_id(&r.id, at)?;
    if SeqId::parse(&r.id).is_none() {
        return Err(BadRequest(format!(
            "{at}id must be <16 hex digits>-<sequence>"
        )));
    }
    if [r.tokens, r.reserved, r.cost, r.reserved_cost]
        .iter()
        .any(|n| *n > MAX_TOKENS)
    {
        return Err(BadRequest(format!(
            "{at}tokens, reserved, cost and reserved_cost must be at most {MAX_TOKENS}"
        )));
    }
    validate_descriptors(&r.descriptors, at)
}

pub fn validate_asm_keys(keys: &[String]) -> Result<(), BadRequest> {
    if keys.len() > MAX_DESCRIPTORS {
        return Err(BadRequest(format!(
            "ratelimit_keys: more than {MAX_DESCRIPTORS}"
        )));
    }
    if keys.iter().any(|k| k.len() > MAX_TEXT) {
        return Err(BadRequest(format!(
            "ratelimit_keys: a key is longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn borrowed_requests_read_back_as_owned_ones() {
        let ds = vec![Descriptor {
            limit: "a".into(),
            value: "ü".into(),
            rates: vec![Rate {
                tokens: 1,
                window_s: 60,
                ..Default::default()
            }],
            shared: true,
            ..Default::default()
        }];
        let sent = CheckRequest {
            descriptors: ds.as_slice(),
            reserve: 7,
            id: Some("00000000000000ab-9".into()),
            ..Default::default()
        };
        let read: CheckRequest =
            serde_json::from_slice(&serde_json::to_vec(&sent).unwrap()).unwrap();
        assert_eq!(read.descriptors, ds);
        assert_eq!(
            (read.reserve, read.id.as_deref()),
            (7, Some("00000000000000ab-9"))
        );
        assert!(validate_check(&read).is_ok());
    }

    #[test]
    fn negative_remaining_reads_as_zero() {
        let s: LimitStatus = serde_json::from_str(r#"{"remaining":-5,"tokens":10}"#).unwrap();
        assert_eq!((s.remaining, s.tokens), (0, 10));
    }

    #[test]
    fn seq_ids_round_trip_and_foreign_ids_do_not_parse() {
        let id = SeqId {
            source: 0xabc,
            seq: 42,
        };
        assert_eq!(id.format(), "0000000000000abc-42");
        assert_eq!(SeqId::parse(&id.format()), Some(id));
        for foreign in [
            "abc-1",
            "0000000000000abc-",
            "0000000000000abc-x",
            "r1",
            "zzzzzzzzzzzzzzzz-1",
        ] {
            assert_eq!(SeqId::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let d = |n: usize| Descriptor {
            limit: "l".repeat(n),
            value: String::new(),
            rates: vec![],
            shared: false,
            ..Default::default()
        };
        assert!(validate_descriptors(&vec![d(1); MAX_DESCRIPTORS], "").is_ok());
        assert!(validate_descriptors(&vec![d(1); MAX_DESCRIPTORS + 1], "").is_err());
        assert!(validate_descriptors(&[d(MAX_TEXT + 1)], "").is_err());
        let big = CheckRequest {
            descriptors: vec![],
            reserve: MAX_TOKENS + 1,
            id: None,
            ..Default::default()
        };
        assert!(validate_check(&big).is_err());
    }
}
