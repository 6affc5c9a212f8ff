//! The one wire contract between the llm-token-ratelimit plugin and its rate-limit service.
//!
//! Both sides build and read these types, so a request the plugin can build is, by
//! construction, one the service understands; the bounds below are checked by the service
//! ([`validate_check`], [`validate_reports`]) and respected by the plugin when it loads its
//! configuration and clamps what clients send. Protocol v1 is JSON over HTTP:
//! `POST /v1/check` and `POST /v1/report`; the ASM endpoints are here too.

pub mod rls;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most descriptors (limits that apply to one request) in one check or report.
pub const MAX_DESCRIPTORS: usize = 64;
/// The most rates one descriptor may carry.
pub const MAX_RATES: usize = 16;
/// The longest limit name or key value, in bytes.
pub const MAX_TEXT: usize = 4096;
/// The most reports in one `/v1/report` call.
pub const MAX_REPORTS: usize = 1000;
/// The largest figure anywhere, in tokens or in micro units of money (budgets, reserves,
/// charges): far above any real budget, far below where integer arithmetic in the stores
/// could overflow.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;
/// The longest window, in seconds.
pub const MAX_WINDOW_S: u64 = 366 * 86_400;
/// The longest request or report id, in bytes.
pub const MAX_ID: usize = 256;
/// The largest request body the service reads; the plugin's report batches stay well below.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The longest IANA time zone name a calendar rate may carry.
pub const MAX_ZONE: usize = 64;

/// What a request spends or reserves: tokens, and micro units (millionths) of money for the
/// limits that count money. A limit counts one of the two ([`Amount::counted`]). Sums
/// saturate at [`MAX_AMOUNT`], so no figure an upstream invents can overflow a store.
/// As JSON (where it stands alone): `{"tokens": n, "cost": micros}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Amount {
    #[serde(default)]
    pub tokens: u64,
    #[serde(default, rename = "cost", skip_serializing_if = "is_zero")]
    pub micros: u64,
}

impl Amount {
    pub const ZERO: Amount = Amount {
        tokens: 0,
        micros: 0,
    };

    /// Both figures, each held to [`MAX_AMOUNT`].
    pub fn new(tokens: u64, micros: u64) -> Amount {
        Amount {
            tokens: tokens.min(MAX_AMOUNT),
            micros: micros.min(MAX_AMOUNT),
        }
    }

    pub fn tokens(tokens: u64) -> Amount {
        Amount::new(tokens, 0)
    }

    pub fn is_zero(self) -> bool {
        self == Amount::ZERO
    }

    /// The sum, each figure held to [`MAX_AMOUNT`].
    pub fn plus(self, other: Amount) -> Amount {
        Amount::new(
            self.tokens.saturating_add(other.tokens),
            self.micros.saturating_add(other.micros),
        )
    }

    /// What is left of `self` after `other`, never below zero.
    pub fn less(self, other: Amount) -> Amount {
        Amount {
            tokens: self.tokens.saturating_sub(other.tokens),
            micros: self.micros.saturating_sub(other.micros),
        }
    }

    /// The figure a limit counts: micro units for one in money, tokens otherwise.
    pub fn counted(self, money: bool) -> u64 {
        if money {
            self.micros
        } else {
            self.tokens
        }
    }

    /// Whether either figure is past [`MAX_AMOUNT`] (only a hand-made request can be).
    pub fn too_large(self) -> bool {
        self.tokens > MAX_AMOUNT || self.micros > MAX_AMOUNT
    }
}

/// One budget: `budget` per `window_s` seconds, or per calendar period, in the unit its
/// descriptor counts (tokens, or micro units of its currency).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rate {
    #[serde(rename = "tokens")]
    pub budget: u64,
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
    /// A shadow limit (`"mode": "shadow"`): checked and counted exactly, but it never denies;
    /// a check it would have denied names it in [`CheckResponse::shadow_denied`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// Fractions of the budget (`[0.5, 0.8, 1.0]`) at which the service raises an alert, once
    /// per threshold, key and window, when a report brings the counter's use to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Threshold>,
}

/// At most this many alert thresholds per limit.
pub const MAX_ALERTS: usize = 8;
/// The largest alert threshold, as a fraction of the budget: a soft (shadow) budget may run
/// far past its budget, and an operator may want to hear of it at 2× or 5×.
pub const MAX_THRESHOLD: f64 = 10.0;

/// An alert threshold: a fraction of the budget, held in thousandths so that it compares,
/// hashes and keys exactly (`0.8` is 800). On the wire it is the fraction, a JSON number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Threshold(u32);

impl Threshold {
    /// The threshold of a fraction in `[0.001, MAX_THRESHOLD]`, to the nearest thousandth;
    /// `None` for anything else.
    pub fn of(fraction: f64) -> Option<Threshold> {
        if !(fraction > 0.0 && fraction <= MAX_THRESHOLD) {
            return None;
        }
        let permille = (fraction * 1000.0).round() as u32;
        (permille >= 1).then_some(Threshold(permille))
    }

    /// Thousandths of the budget.
    pub fn permille(self) -> u32 {
        self.0
    }

    pub fn fraction(self) -> f64 {
        f64::from(self.0) / 1000.0
    }

    /// Whether `used` of `budget` has reached it (exactly, in integers).
    pub fn reached(self, used: i64, budget: i64) -> bool {
        budget > 0 && i128::from(used) * 1000 >= i128::from(budget) * i128::from(self.0)
    }
}

impl Serialize for Threshold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.fraction())
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Threshold, D::Error> {
        let fraction = f64::deserialize(d)?;
        Threshold::of(fraction).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "an alert threshold is a fraction of the budget from 0.001 to {MAX_THRESHOLD}, not {fraction}"
            ))
        })
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `POST /v1/check`. Generic over how the descriptors are held, so the plugin serialises a
/// borrowed slice and the service reads an owned vector. JSON: `descriptors`, `reserve`
/// (tokens), `reserve_cost` (micro units), `id`, `trim`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckRequest<D = Vec<Descriptor>> {
    pub descriptors: D,
    /// Taken from every descriptor on admission: tokens, or micro units from those that
    /// count money.
    pub reserve: Amount,
    /// The id the request's report will carry (`<source>-<sequence>`): lets a later release
    /// find out whether this check's reservation was applied.
    pub id: Option<String>,
    /// Serve within the budget: take less than `reserve` rather than refuse.
    pub trim: Option<Trim>,
    /// Admission without a round trip: the plugin asks for a quota lease on these
    /// descriptors ([`LeaseAsk`]).
    pub lease: Option<LeaseAsk>,
}

/// A plugin VM asks to admit later requests for the same descriptors itself, out of `amount`
/// taken now from every descriptor as one reservation. The service grants the whole amount or
/// nothing, so the plugin always knows what a lease it never heard back about may have taken:
/// its release (a report naming `id`) gives back exactly that.
/// JSON: `{"id": "<source>-<sequence>", "tokens": n, "cost": micros}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAsk {
    pub id: String,
    #[serde(flatten)]
    pub amount: Amount,
}

/// The service's answer to a [`LeaseAsk`], in [`CheckResponse::lease`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The amount taken, when the lease was granted (always the whole ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Amount>,
    /// When the lease was taken, by the service's clock: requests admitted under it settle in
    /// that window, as any reservation does.
    #[serde(default)]
    pub reserved_at_ms: u64,
    /// How long local admission may last, counted from when the plugin sent the ask. Never
    /// past the end of the window (or calendar period) the lease was taken in.
    #[serde(default)]
    pub ttl_ms: u64,
    /// The most the service would lease now, per unit: what the next ask should not exceed.
    #[serde(default)]
    pub room: Amount,
}

/// Serve within the budget instead of refusing: when `reserve` does not fit, the service takes
/// the largest reservation between `min` and `reserve` tokens that every limit can pay for,
/// tokens and money alike, and says so in [`CheckResponse::granted`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trim {
    /// The least reservation worth serving, in tokens.
    pub min: u64,
    /// The part of `reserve` that does not shrink with the output cap (the prompt's
    /// estimate). A grant of `t` tokens costs `fixed.micros` plus the rest of
    /// `reserve.micros` in proportion to `t - fixed.tokens` (see [`Trim::cost`]).
    #[serde(default)]
    pub fixed: Amount,
}

impl Trim {
    /// What a grant of `tokens` costs in micro units when the whole `reserve` costs
    /// `reserve.micros`. Computed with the same IEEE operations by every store (the Redis
    /// script mirrors it), so they grant alike.
    pub fn cost(&self, reserve: Amount, tokens: u64) -> u64 {
        let (span, price) = self.slope(reserve);
        if span == 0 || tokens >= reserve.tokens {
            return reserve.micros;
        }
        let extra = tokens.saturating_sub(self.fixed.tokens) as f64 * price;
        self.fixed.micros.saturating_add(extra.ceil() as u64)
    }

    /// The most tokens (at most `reserve.tokens`) a budget of `remaining` micro units can be
    /// granted; `None`: not even the fixed part.
    pub fn tokens_for(&self, reserve: Amount, remaining: u64) -> Option<u64> {
        let left = remaining.checked_sub(self.fixed.micros)?;
        let (span, price) = self.slope(reserve);
        if span == 0 || price <= 0.0 {
            return Some(reserve.tokens);
        }
        let mut tokens = self
            .fixed
            .tokens
            .saturating_add((left as f64 / price).floor() as u64)
            .min(reserve.tokens);
        // The division may land one above where the cost, rounded up, still fits.
        if tokens > self.fixed.tokens && self.cost(reserve, tokens) > remaining {
            tokens -= 1;
        }
        Some(tokens)
    }

    /// The tokens that scale, and the micro units per token above the fixed part.
    fn slope(&self, reserve: Amount) -> (u64, f64) {
        let span = reserve.tokens.saturating_sub(self.fixed.tokens);
        let money = reserve.micros.saturating_sub(self.fixed.micros);
        if span == 0 {
            return (0, 0.0);
        }
        (span, money as f64 / span as f64)
    }
}

/// [`CheckRequest`] as JSON spells it.
#[derive(Serialize, Deserialize)]
struct CheckJson<I, D> {
    descriptors: D,
    #[serde(default)]
    reserve: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    reserve_cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<I>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trim: Option<Trim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseAsk>,
}

impl<D: Serialize> Serialize for CheckRequest<D> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        CheckJson {
            descriptors: &self.descriptors,
            reserve: self.reserve.tokens,
            reserve_cost: self.reserve.micros,
            id: self.id.as_deref(),
            trim: self.trim,
            lease: self.lease.clone(),
        }
        .serialize(s)
    }
}

impl<'de, D: Deserialize<'de>> Deserialize<'de> for CheckRequest<D> {
    fn deserialize<De: Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        let j = CheckJson::<String, D>::deserialize(d)?;
        Ok(CheckRequest {
            descriptors: j.descriptors,
            reserve: Amount {
                tokens: j.reserve,
                micros: j.reserve_cost,
            },
            id: j.id,
            trim: j.trim,
            lease: j.lease,
        })
    }
}

/// The state of one rate of one descriptor after a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitStatus {
    pub limit: String,
    pub value: String,
    /// The rate's budget, in the limit's unit (tokens, or micro units of `currency`).
    #[serde(rename = "tokens")]
    pub budget: u64,
    pub window_s: u64,
    /// Clamped to `[0, budget]`: a counter in debt reports 0.
    #[serde(deserialize_with = "non_negative")]
    pub remaining: u64,
    pub reset_ms: u64,
    /// A limit that counts money: `budget` and `remaining` are micro units of this currency.
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
    /// A trimmed check ([`Trim`]): what was taken instead of the whole reserve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Amount>,
    /// The shadow limits that would have denied this check had they been enforced. Shadow
    /// limits are left out of `limits`, `retry_after_ms` and `denied_by`: they never decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_denied: Vec<String>,
    /// The answer to the check's [`LeaseAsk`], if it made one and was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseAnswer>,
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

impl UsageFigures {
    /// Both requests' figures, summed (saturating).
    pub fn plus(self, o: UsageFigures) -> UsageFigures {
        UsageFigures {
            prompt_tokens: self.prompt_tokens.saturating_add(o.prompt_tokens),
            completion_tokens: self.completion_tokens.saturating_add(o.completion_tokens),
            total_tokens: self.total_tokens.saturating_add(o.total_tokens),
            cached_prompt_tokens: self
                .cached_prompt_tokens
                .saturating_add(o.cached_prompt_tokens),
            reasoning_tokens: self.reasoning_tokens.saturating_add(o.reasoning_tokens),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the requests a report carries used on one model, whole, for the service's spend
/// ledger: the amounts a report settles are only what differs from reservations. JSON:
/// `{"model": "gpt-4o", "requests": 2, "tokens": 300, "cost": 4500}`; a report carries a list,
/// one per model (at most [`MAX_SPEND_MODELS`]; the rest under no model).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spend {
    /// The model the requests named; absent when the plugin did not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub requests: u64,
    #[serde(flatten)]
    pub used: Amount,
}

/// What one request (or, merged, several) spent. The service charges `used − reserved`:
/// an excess now, a refund in the window of `reserved_at_ms`, never below zero. JSON: `used`
/// is `tokens` and `cost`, `reserved` is `reserved` and `reserved_cost` (micro units, charged
/// to the descriptors that count money).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report<D = Vec<Descriptor>> {
    /// Unique per report, stable across retries (`<source>-<sequence>`).
    pub id: String,
    pub descriptors: D,
    pub used: Amount,
    pub reserved: Amount,
    pub reserved_at_ms: Option<u64>,
    /// The id of a check whose answer the plugin never saw (the stream ended during the
    /// check, or the check timed out): `reserved` counts only if the service took that check's
    /// reservation, and is released at most once.
    pub release: Option<String>,
    pub usage: Option<UsageFigures>,
    /// What the requests carried used, whole, per model (the ledger's figures).
    pub spend: Vec<Spend>,
}

/// The most models one report's `spend` names.
pub const MAX_SPEND_MODELS: usize = 16;

impl Spend {
    /// Adds `add` to `list`, under its model while the list names fewer than
    /// [`MAX_SPEND_MODELS`] models, else under no model: however many models requests name,
    /// a report stays small.
    pub fn merge(list: &mut Vec<Spend>, add: Spend) {
        let named = list.iter().filter(|s| s.model.is_some()).count();
        // A model already listed stays under its name.
        let listed = add.model.is_some() && list.iter().any(|s| s.model == add.model);
        let model = add.model.filter(|_| listed || named < MAX_SPEND_MODELS);
        let found = list.iter_mut().find(|s| s.model == model);
        match found {
            Some(s) => {
                s.requests = s.requests.saturating_add(add.requests);
                s.used = s.used.plus(add.used);
            }
            None => list.push(Spend {
                model,
                requests: add.requests,
                used: add.used,
            }),
        }
    }
}

/// [`Report`] as JSON spells it.
#[derive(Serialize, Deserialize)]
struct ReportJson<I, D, S> {
    id: I,
    descriptors: D,
    tokens: u64,
    #[serde(default)]
    reserved: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    cost: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    reserved_cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reserved_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    release: Option<I>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<UsageFigures>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    spend: Vec<S>,
}

impl<D: Serialize> Serialize for Report<D> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ReportJson {
            id: self.id.as_str(),
            descriptors: &self.descriptors,
            tokens: self.used.tokens,
            reserved: self.reserved.tokens,
            cost: self.used.micros,
            reserved_cost: self.reserved.micros,
            reserved_at_ms: self.reserved_at_ms,
            release: self.release.as_deref(),
            usage: self.usage,
            spend: self.spend.iter().collect(),
        }
        .serialize(s)
    }
}

impl<'de, D: Deserialize<'de>> Deserialize<'de> for Report<D> {
    fn deserialize<De: Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        let j = ReportJson::<String, D, Spend>::deserialize(d)?;
        Ok(Report {
            id: j.id,
            descriptors: j.descriptors,
            used: Amount {
                tokens: j.tokens,
                micros: j.cost,
            },
            reserved: Amount {
                tokens: j.reserved,
                micros: j.reserved_cost,
            },
            reserved_at_ms: j.reserved_at_ms,
            release: j.release,
            usage: j.usage,
            spend: j.spend,
        })
    }
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
        if d.alerts.len() > MAX_ALERTS {
            return Err(BadRequest(format!("{here}.alerts: more than {MAX_ALERTS}")));
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
            if r.budget == 0 || r.budget > MAX_AMOUNT {
                return Err(BadRequest(format!(
                    "{here}.rates[{j}].tokens must be between 1 and {MAX_AMOUNT}"
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
    if req.reserve.too_large() {
        return Err(BadRequest(format!(
            "reserve and reserve_cost must be at most {MAX_AMOUNT}"
        )));
    }
    if let Some(t) = &req.trim {
        if t.min <= t.fixed.tokens || t.min > req.reserve.tokens {
            return Err(BadRequest(
                "trim.min must be above trim.fixed.tokens and at most reserve".into(),
            ));
        }
        // A figure held at the bound no longer prices a grant in proportion.
        if req.reserve.tokens >= MAX_AMOUNT || req.reserve.micros >= MAX_AMOUNT {
            return Err(BadRequest(format!(
                "a trimmed reserve must be below {MAX_AMOUNT}, tokens and cost"
            )));
        }
        if t.fixed.tokens > req.reserve.tokens || t.fixed.micros > req.reserve.micros {
            return Err(BadRequest(
                "trim.fixed must be at most the reserve (tokens and cost)".into(),
            ));
        }
    }
    if let Some(id) = &req.id {
        validate_id(id, "")?;
    }
    if let Some(lease) = &req.lease {
        validate_id(&lease.id, "lease.")?;
        if lease.amount.is_zero() || lease.amount.too_large() {
            return Err(BadRequest(format!(
                "lease.tokens and lease.cost must be at most {MAX_AMOUNT}, and not both 0"
            )));
        }
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
    if r.used.too_large() || r.reserved.too_large() {
        return Err(BadRequest(format!(
            "{at}tokens, reserved, cost and reserved_cost must be at most {MAX_AMOUNT}"
        )));
    }
    if r.spend.len() > MAX_SPEND_MODELS + 1 {
        return Err(BadRequest(format!(
            "{at}spend: more than {} entries",
            MAX_SPEND_MODELS + 1
        )));
    }
    for s in &r.spend {
        if s.used.too_large() || s.requests > MAX_AMOUNT {
            return Err(BadRequest(format!(
                "{at}spend: requests, tokens and cost must be at most {MAX_AMOUNT}"
            )));
        }
        if s.model.as_ref().is_some_and(|m| m.len() > MAX_ID) {
            return Err(BadRequest(format!(
                "{at}spend.model must be at most {MAX_ID} bytes"
            )));
        }
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
                budget: 1,
                window_s: 60,
                ..Default::default()
            }],
            shared: true,
            ..Default::default()
        }];
        let sent = CheckRequest {
            descriptors: ds.as_slice(),
            reserve: Amount::new(7, 3),
            id: Some("00000000000000ab-9".into()),
            trim: None,
            lease: Some(LeaseAsk {
                id: "00000000000000ab-10".into(),
                amount: Amount::new(700, 300),
            }),
        };
        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(
            json["lease"],
            serde_json::json!({"id": "00000000000000ab-10", "tokens": 700, "cost": 300})
        );
        let read: CheckRequest = serde_json::from_value(json).unwrap();
        assert_eq!(read.descriptors, ds);
        assert_eq!(
            (read.reserve, read.id.as_deref(), read.lease.clone()),
            (Amount::new(7, 3), Some("00000000000000ab-9"), sent.lease)
        );
        assert!(validate_check(&read).is_ok());
        // A lease of nothing, or past the bound, is refused.
        let past = Amount {
            tokens: MAX_AMOUNT + 1,
            micros: 0,
        };
        for amount in [Amount::ZERO, past] {
            let ask = CheckRequest {
                lease: Some(LeaseAsk {
                    id: "00000000000000ab-11".into(),
                    amount,
                }),
                ..read.clone()
            };
            assert!(validate_check(&ask).is_err());
        }
    }

    /// The amounts keep the names every released plugin and service speak.
    #[test]
    fn amounts_keep_their_json_names() {
        let check = CheckRequest::<Vec<Descriptor>> {
            reserve: Amount::new(5, 0),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&check).unwrap(),
            r#"{"descriptors":[],"reserve":5}"#
        );
        let report = Report::<Vec<Descriptor>> {
            id: "r".into(),
            used: Amount::new(10, 20),
            reserved: Amount::new(3, 4),
            ..Default::default()
        };
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            r#"{"id":"r","descriptors":[],"tokens":10,"reserved":3,"cost":20,"reserved_cost":4}"#
        );
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
        let rate: Rate = serde_json::from_str(r#"{"tokens":9,"window_s":60}"#).unwrap();
        assert_eq!(rate.budget, 9);
    }

    /// A grant's cost: the fixed part, and the rest in proportion; and its inverse, exact at
    /// the rounding edges.
    #[test]
    fn trims_price_grants_in_proportion() {
        let trim = Trim {
            min: 150,
            fixed: Amount::new(100, 500_000),
        };
        let reserve = Amount::new(1000, 5_000_000);
        assert_eq!(trim.cost(reserve, 1000), 5_000_000);
        assert_eq!(trim.cost(reserve, 300), 1_500_000);
        assert_eq!(trim.tokens_for(reserve, 1_500_000), Some(300));
        assert_eq!(trim.tokens_for(reserve, 1_504_999), Some(300));
        assert_eq!(trim.tokens_for(reserve, 499_999), None);
        assert_eq!(trim.tokens_for(reserve, u64::MAX), Some(1000));
        // Prices that do not divide: the grant never costs more than what is left.
        let odd = Amount::new(7, 1_000_003);
        let t = Trim {
            min: 1,
            fixed: Amount::ZERO,
        };
        for left in 0..2_000_000u64 {
            if let Some(tokens) = t.tokens_for(odd, left) {
                assert!(t.cost(odd, tokens) <= left || tokens == 0, "{left}");
            }
        }
    }

    #[test]
    fn amounts_saturate() {
        let big = Amount::new(u64::MAX, MAX_AMOUNT);
        assert_eq!(big, Amount::new(MAX_AMOUNT, MAX_AMOUNT));
        assert_eq!(big.plus(big), big);
        assert_eq!(Amount::tokens(3).less(Amount::new(5, 1)), Amount::ZERO);
        assert_eq!(Amount::new(1, 2).counted(true), 2);
    }

    #[test]
    fn negative_remaining_reads_as_zero() {
        let s: LimitStatus = serde_json::from_str(r#"{"remaining":-5,"tokens":10}"#).unwrap();
        assert_eq!((s.remaining, s.budget), (0, 10));
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
            reserve: Amount {
                tokens: MAX_AMOUNT + 1,
                micros: 0,
            },
            id: None,
            trim: None,
            lease: None,
        };
        assert!(validate_check(&big).is_err());
    }

    /// A report's `spend` (the ledger's figures) reads back as written, and the service
    /// refuses figures past the bounds and a model name longer than an id.
    #[test]
    fn a_reports_spend_round_trips_and_is_bounded() {
        let json = r#"{"id":"00000000000000ab-1","descriptors":[{"limit":"l","value":"v"}],"tokens":0,"spend":[{"model":"gpt-4o","requests":2,"tokens":300,"cost":4500}]}"#;
        let r: Report = serde_json::from_str(json).unwrap();
        let spend = r.spend[0].clone();
        assert_eq!(
            (spend.model.as_deref(), spend.requests, spend.used),
            (Some("gpt-4o"), 2, Amount::new(300, 4500))
        );
        let back: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            back["spend"],
            serde_json::json!([{"model": "gpt-4o", "requests": 2, "tokens": 300, "cost": 4500}])
        );
        assert!(validate_report(&r, "").is_ok());
        let mut long = r.clone();
        long.spend[0].model = Some("m".repeat(MAX_ID + 1));
        assert!(validate_report(&long, "").is_err());
        let mut huge = r;
        huge.spend[0].used.tokens = MAX_AMOUNT + 1;
        assert!(validate_report(&huge, "").is_err());
    }

    /// However many models requests name, one report's spend lists at most sixteen of them and
    /// the rest under no model, every token kept.
    #[test]
    fn spend_lists_stay_small() {
        let mut list = Vec::new();
        for i in 0..40u64 {
            let add = Spend {
                model: Some(format!("m{}", i % 20)),
                requests: 1,
                used: Amount::tokens(10),
            };
            Spend::merge(&mut list, add);
        }
        assert_eq!(list.len(), MAX_SPEND_MODELS + 1);
        assert_eq!(list.iter().map(|s| s.requests).sum::<u64>(), 40);
        assert_eq!(list.iter().find(|s| s.model.is_none()).unwrap().requests, 8);
    }
}
