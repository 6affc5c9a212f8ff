//! Usage reports on their way to the service: a coalescing queue bounded by distinct keys,
//! several calls in flight, per-report outcomes, retries without end and without duplicates.
//!
//! HTTP streams hand over what a request spent ([`Spent`]). Waiting reports that settle the
//! same descriptors the same way merge (tokens add up), so the queue's size is the number of
//! distinct keys, not of requests, and an outage of any length loses nothing while those stay
//! under the bound; past it the oldest waiting entry is dropped (counted). A report is given its
//! id (`<source>-<sequence>`) when it is sealed into a call, and from then on never changes, so
//! a retry is recognised by the service and applied exactly once. The sequence of sealed ids
//! never runs more than [`wire::REPORT_WINDOW`] ahead of the oldest still outstanding, the
//! window the service remembers per source.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use wire::{Amount, Outcome, SeqId, UsageFigures};

use crate::limits::Descriptor;

pub use wire::Report;

/// The most distinct keys waiting per VM, unless configured otherwise.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// The most reports in one `/v1/report` call.
pub const BATCH: usize = 100;
const FIRST_BACKOFF_MS: u64 = 250;
const MAX_BACKOFF_MS: u64 = 10_000;
/// The most bytes of reports in one call: half of what the service reads.
const BATCH_BYTES: usize = wire::MAX_BODY_BYTES / 2;

/// What one request spent, as its stream hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub descriptors: Vec<Descriptor>,
    /// What the request used: tokens, and what it cost in micro units (charged to the
    /// descriptors that count money).
    pub used: Amount,
    /// What the check asked the service to take.
    pub reserved: Amount,
    /// When the service took it (its clock).
    pub reserved_at_ms: Option<u64>,
    /// The id of the check whose reservation this releases (its answer was never seen).
    pub release: Option<String>,
    pub usage: UsageFigures,
    /// The quota lease the request was admitted under, if any: what it used beyond its
    /// reservation shrinks that lease (the queue itself ignores it).
    pub lease: Option<String>,
    /// A served request's own spending (`used` is what it used, whole), as the service's
    /// spend ledger counts it; not a lease's give-back nor a release.
    pub request: bool,
    /// The model the response (else the request) named, if the plugin read one.
    pub model: Option<String>,
}

/// How a waiting entry settles its descriptors; only entries of one kind merge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// Tokens charged now (usage beyond any reservation).
    Charge,
    /// Unused reserved tokens given back to the window of their reservation; reservations
    /// taken in one second share every window, so they merge.
    Refund(Option<u64>),
    /// A release of one check's reservation: never merged.
    Release(String),
}

#[derive(Debug, Clone)]
struct Pending {
    descriptors: Vec<Descriptor>,
    kind: Kind,
    /// To charge (the excess over a reservation, or a release's whole use) and to give back.
    used: Amount,
    reserved: Amount,
    reserved_at_ms: Option<u64>,
    usage: UsageFigures,
    /// Requests merged into this entry, and the tokens they used (for the metrics, which
    /// count requests and their usage whatever the entry's share of it).
    requests: u64,
    tokens_used: u64,
    /// What the served requests merged here used, whole, per model (the service's spend
    /// ledger): a short list, so models never keep entries apart.
    spend: Vec<wire::Spend>,
}

impl Pending {
    fn key_hash(descriptors: &[Descriptor], kind: &Kind) -> u64 {
        let mut h = DefaultHasher::new();
        descriptors.hash(&mut h);
        kind.hash(&mut h);
        h.finish()
    }

    fn absorb(&mut self, other: &Pending) {
        self.used = self.used.plus(other.used);
        self.reserved = self.reserved.plus(other.reserved);
        self.usage = self.usage.plus(other.usage);
        self.requests += other.requests;
        self.tokens_used = self.tokens_used.saturating_add(other.tokens_used);
        for s in &other.spend {
            wire::Spend::merge(&mut self.spend, s.clone());
        }
    }
}

/// A report with its id, as sent (and sent again) unchanged.
#[derive(Debug, Clone)]
struct Sealed {
    report: Report,
    seq: u64,
    requests: u64,
    tokens_used: u64,
    /// Sent alone, to find which report of a refused batch the service cannot take.
    solo: bool,
    /// Part of what an engine refused past a limit, sent to find what still fits (see
    /// [`Delivery::OverLimit`]): the most that may still fit, this part included.
    probe: Option<u64>,
}

/// Makes ids: a per-VM random source and a sequence number.
#[derive(Debug, Clone)]
pub struct ReportIds {
    source: u64,
    next: u64,
}

impl ReportIds {
    pub fn new(seed: u64) -> ReportIds {
        ReportIds {
            source: seed,
            next: 0,
        }
    }

    /// The next sequence number and its id.
    pub fn next_seq(&mut self) -> (u64, String) {
        self.next += 1;
        let id = SeqId {
            source: self.source,
            seq: self.next,
        };
        (self.next, id.format())
    }

    pub fn next_id(&mut self) -> String {
        self.next_seq().1
    }
}

/// The next part of a refused report to send: `next` tokens (none reserved), with at most
/// `bound` still fitting; `None` when nothing more can fit.
fn probe(sealed: Sealed, bound: u64, next: u64) -> Option<Sealed> {
    (bound > 0 && next > 0).then(|| {
        let mut part = sealed;
        part.report.used = Amount::tokens(next.min(bound));
        part.report.reserved = Amount::ZERO;
        part.probe = Some(bound);
        part
    })
}

/// How a report call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The service answered; per report, in order (an answer without them: all applied).
    Answered(Vec<Outcome>),
    /// Unreachable, slow or failing (no answer, timeout, 408, 429, 5xx): try again later.
    Retry,
    /// The call as a whole was refused as malformed (4xx).
    Refused,
    /// An engine that refuses a hit past the limit (Limitador) did not count the call's one
    /// report. `fits`: the tokens still left under the limit, when the engine says. What fits
    /// is sent again so the budget ends exactly spent: the amount the engine named, or, when
    /// it names none (Limitador), half of what may fit, halving again on each refusal, so the
    /// search ends within about log2(tokens) calls.
    OverLimit { fits: Option<u64> },
}

/// What settling a call did, for the metrics, in requests (an entry may hold several).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Requests whose report the service applied (or had applied before), and their usage.
    pub sent: u64,
    pub tokens: u64,
    pub retried: u64,
    /// Refused by the service: can never be applied, dropped.
    pub rejected: u64,
    /// Tokens an engine would not record past a limit (see [`Delivery::OverLimit`]).
    pub over_limit: u64,
}

/// See the module documentation.
pub struct ReportQueue {
    /// Oldest first; a merge keeps the entry where it was.
    waiting: VecDeque<Pending>,
    /// Key hash → absolute position in `waiting` (position − `popped` is the index). The key
    /// hash is keyed the same everywhere (anyone can compute it for the key values they send),
    /// so the map hashes it again with this VM's random keys: crafted values cannot pile into
    /// one bucket.
    index: HashMap<u64, u64>,
    popped: u64,
    /// Sealed reports to send again, in id order.
    retry: VecDeque<Sealed>,
    /// Calls in flight: number, when they left, their reports.
    in_flight: Vec<(u64, u64, Vec<Sealed>)>,
    ids: ReportIds,
    /// No call leaves before this time (backoff after a failure).
    retry_at_ms: u64,
    failures: u32,
    capacity: usize,
    batch: usize,
    max_in_flight: usize,
}

impl ReportQueue {
    /// `batch`: reports per call (1 for protocols that take one at a time); `max_in_flight`:
    /// calls at once; `capacity`: distinct keys waiting.
    pub fn new(ids: ReportIds, batch: usize, max_in_flight: usize, capacity: usize) -> ReportQueue {
        let mut q = ReportQueue {
            waiting: VecDeque::new(),
            index: HashMap::default(),
            popped: 0,
            retry: VecDeque::new(),
            in_flight: Vec::new(),
            ids,
            retry_at_ms: 0,
            failures: 0,
            capacity: 1,
            batch: 1,
            max_in_flight: 1,
        };
        q.resize(batch, max_in_flight, capacity);
        q
    }

    /// A new configuration may speak another protocol or allow another capacity.
    pub fn resize(&mut self, batch: usize, max_in_flight: usize, capacity: usize) {
        self.batch = batch.clamp(1, BATCH);
        self.max_in_flight = max_in_flight.max(1);
        self.capacity = capacity.max(1);
    }

    /// Queues what a request spent; returns how many requests' reports were dropped to make
    /// room (the oldest waiting entry, past the capacity).
    pub fn push(&mut self, spent: Spent) -> u64 {
        let Spent {
            descriptors,
            used,
            reserved,
            reserved_at_ms,
            release,
            usage,
            lease: _,
            request,
            model,
        } = spent;
        // (kind, to charge, to give back, when reserved)
        let mut parts = Vec::with_capacity(2);
        if let Some(check) = release {
            // A release settles as a refund does: in the window its reservation was taken in.
            parts.push((Kind::Release(check), used, reserved, reserved_at_ms));
        } else {
            let (excess, refund) = (used.less(reserved), reserved.less(used));
            if !excess.is_zero() {
                parts.push((Kind::Charge, excess, Amount::ZERO, None));
            }
            if !refund.is_zero() {
                let second = reserved_at_ms.map(|t| t / 1000);
                parts.push((Kind::Refund(second), Amount::ZERO, refund, reserved_at_ms));
            }
            // It used exactly what its check took: nothing to settle, but a limit with alerts
            // hears of it all the same (the service raises alerts on reports, never on a
            // check's reservation alone).
            // So does the spend ledger, for a served request that used something.
            let heard = descriptors.iter().any(|d| !d.alerts.is_empty());
            if parts.is_empty() && (heard || (request && !used.is_zero())) {
                parts.push((Kind::Charge, Amount::ZERO, Amount::ZERO, None));
            }
        }
        let mut dropped = 0;
        let mut usage = Some(usage);
        let last = parts.len().saturating_sub(1);
        let mut descriptors = Some(descriptors);
        for (i, (kind, charged, given_back, at)) in parts.into_iter().enumerate() {
            let descriptors = if i == last {
                descriptors.take().unwrap_or_default()
            } else {
                descriptors.clone().unwrap_or_default()
            };
            dropped += self.add(Pending {
                descriptors,
                kind,
                used: charged,
                reserved: given_back,
                reserved_at_ms: at,
                // The usage, and the request itself, travel with the first part.
                requests: u64::from(i == 0),
                tokens_used: if i == 0 { used.tokens } else { 0 },
                spend: if i == 0 && request {
                    vec![wire::Spend {
                        model: model.clone(),
                        requests: 1,
                        used,
                    }]
                } else {
                    Vec::new()
                },
                usage: usage.take().unwrap_or_default(),
            });
        }
        dropped
    }

    fn add(&mut self, entry: Pending) -> u64 {
        let hash = Pending::key_hash(&entry.descriptors, &entry.kind);
        if !matches!(entry.kind, Kind::Release(_)) {
            if let Some(&pos) = self.index.get(&hash) {
                if let Some(existing) = pos
                    .checked_sub(self.popped)
                    .and_then(|i| self.waiting.get_mut(i as usize))
                {
                    if existing.kind == entry.kind && existing.descriptors == entry.descriptors {
                        existing.absorb(&entry);
                        return 0;
                    }
                }
            }
        }
        let mut dropped = 0;
        while self.waiting.len() >= self.capacity {
            dropped += self.pop_waiting().map_or(0, |p| p.requests.max(1));
        }
        self.index
            .insert(hash, self.popped + self.waiting.len() as u64);
        self.waiting.push_back(entry);
        dropped
    }

    fn pop_waiting(&mut self) -> Option<Pending> {
        let entry = self.waiting.pop_front()?;
        let hash = Pending::key_hash(&entry.descriptors, &entry.kind);
        if self.index.get(&hash) == Some(&self.popped) {
            self.index.remove(&hash);
        }
        self.popped += 1;
        Some(entry)
    }

    /// Entries waiting, sealed for a retry and in flight.
    pub fn len(&self) -> usize {
        self.waiting.len()
            + self.retry.len()
            + self
                .in_flight
                .iter()
                .map(|(_, _, b)| b.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The oldest sequence number still outstanding (sealed, not yet settled).
    fn oldest_outstanding(&self) -> Option<u64> {
        let retry = self.retry.iter().map(|s| s.seq);
        let flying = self
            .in_flight
            .iter()
            .flat_map(|(_, _, b)| b.iter().map(|s| s.seq));
        retry.chain(flying).min()
    }

    /// Whether as many calls are in flight as may be: the next leaves when one is answered.
    pub fn flights_full(&self) -> bool {
        self.in_flight.len() >= self.max_in_flight
    }

    /// Starts the next call when one may leave now: its number and the reports to send.
    pub fn start_batch(&mut self, now_ms: u64, call: u64) -> Option<Vec<&Report>> {
        if self.in_flight.len() >= self.max_in_flight || now_ms < self.retry_at_ms {
            return None;
        }
        let mut batch: Vec<Sealed> = Vec::new();
        let mut bytes = 0;
        if self.retry.front().is_some_and(|s| s.solo) {
            batch.extend(self.retry.pop_front());
        } else {
            while let Some(next) = self.retry.front() {
                if batch.len() >= self.batch || next.solo {
                    break;
                }
                bytes += encoded_size(&next.report);
                if !batch.is_empty() && bytes > BATCH_BYTES {
                    break;
                }
                batch.extend(self.retry.pop_front());
            }
        }
        if batch.is_empty() {
            // New ids only while the service can still tell every outstanding one apart.
            let limit = self.oldest_outstanding().map_or(u64::MAX, |o| {
                o + wire::REPORT_WINDOW - self.batch as u64 - 1
            });
            while batch.len() < self.batch && self.ids.next < limit {
                let Some(next) = self.waiting.front() else {
                    break;
                };
                bytes += pending_size(next);
                if !batch.is_empty() && bytes > BATCH_BYTES {
                    break;
                }
                let Some(p) = self.pop_waiting() else { break };
                let (seq, id) = self.ids.next_seq();
                batch.push(Sealed {
                    report: Report {
                        id,
                        descriptors: p.descriptors,
                        used: p.used,
                        reserved: p.reserved,
                        reserved_at_ms: p.reserved_at_ms,
                        release: match p.kind {
                            Kind::Release(check) => Some(check),
                            Kind::Charge | Kind::Refund(_) => None,
                        },
                        usage: Some(p.usage),
                        spend: p.spend,
                    },
                    seq,
                    requests: p.requests,
                    tokens_used: p.tokens_used,
                    solo: false,
                    probe: None,
                });
            }
        }
        if batch.is_empty() {
            return None;
        }
        self.in_flight.push((call, now_ms, batch));
        self.in_flight
            .last()
            .map(|(_, _, b)| b.iter().map(|s| &s.report).collect())
    }

    /// Call `call` ended (or could not be dispatched): settle its reports.
    pub fn finish_batch(&mut self, call: u64, delivery: Delivery, now_ms: u64) -> Settled {
        let mut settled = Settled::default();
        let Some(i) = self.in_flight.iter().position(|(c, _, _)| *c == call) else {
            return settled;
        };
        let (_, _, batch) = self.in_flight.swap_remove(i);
        let single = batch.len() == 1;
        let mut again = Vec::new();
        for (j, mut sealed) in batch.into_iter().enumerate() {
            let requests = sealed.requests;
            let outcome = match &delivery {
                Delivery::Answered(outcomes) => {
                    outcomes.get(j).copied().unwrap_or(Outcome::Applied)
                }
                Delivery::Retry => Outcome::Retry,
                Delivery::Refused if single => Outcome::Rejected,
                // One of them is refused: find which by sending each alone.
                Delivery::Refused => {
                    again.push(Sealed {
                        solo: true,
                        ..sealed
                    });
                    continue;
                }
                // A report for several counters is refused whole when one is over (Limitador):
                // each counter is then settled on its own, so the looser ones still get what
                // the tightest cannot take.
                Delivery::OverLimit { .. }
                    if sealed.probe.is_none() && sealed.report.descriptors.len() > 1 =>
                {
                    for (k, d) in std::mem::take(&mut sealed.report.descriptors)
                        .into_iter()
                        .enumerate()
                    {
                        let mut one = sealed.clone();
                        one.report.descriptors = vec![d];
                        one.solo = true;
                        // The requests are counted once, with the first part.
                        if k > 0 {
                            (one.requests, one.tokens_used) = (0, 0);
                        }
                        again.push(one);
                    }
                    continue;
                }
                Delivery::OverLimit { fits } => {
                    // The hits this call sent; at most `bound` of them could have fitted.
                    let sent = sealed.report.used.less(sealed.report.reserved).tokens;
                    let bound = sealed.probe.unwrap_or(sent);
                    let may_fit = sent.saturating_sub(1).min(fits.unwrap_or(u64::MAX));
                    settled.over_limit += bound.saturating_sub(may_fit);
                    // The engine's figure is tried once; past that (it was wrong, or others
                    // spent the room meanwhile) the search halves, so it stays within
                    // about log2(tokens) calls whatever the engine says.
                    let next = if fits.is_some() && sealed.probe.is_none() {
                        may_fit
                    } else {
                        may_fit.div_ceil(2)
                    };
                    match probe(sealed, may_fit, next) {
                        Some(smaller) => again.push(smaller),
                        None => settled.sent += requests,
                    }
                    continue;
                }
            };
            // A part of a refused report was counted: look for room for the rest.
            if let (Outcome::Applied, Some(bound)) = (outcome, sealed.probe) {
                let left = bound.saturating_sub(sealed.report.used.tokens);
                match probe(sealed, left, left.div_ceil(2)) {
                    Some(smaller) => again.push(smaller),
                    None => settled.sent += requests,
                }
                continue;
            }
            match outcome {
                Outcome::Applied | Outcome::Duplicate => {
                    settled.sent += sealed.requests;
                    settled.tokens += sealed.tokens_used;
                }
                Outcome::Rejected => settled.rejected += sealed.requests.max(1),
                Outcome::Retry => {
                    settled.retried += sealed.requests.max(1);
                    again.push(sealed);
                }
            }
        }
        if settled.retried > 0 {
            self.failures = self.failures.saturating_add(1);
            self.retry_at_ms = now_ms.saturating_add(backoff_ms(self.failures));
        } else {
            self.failures = 0;
        }
        for s in again {
            let at = self.retry.partition_point(|r| r.seq < s.seq);
            self.retry.insert(at, s);
        }
        settled
    }

    /// Lets the next calls leave at once, whatever the backoff says (the VM is stopping: there
    /// may be no later).
    pub fn skip_backoff(&mut self) {
        self.retry_at_ms = 0;
    }

    /// Calls that left before `before_ms`: past their deadline, their answer will never come
    /// (the root context that made them is gone), so they are to be settled as failed and sent
    /// again, with the same ids.
    pub fn overdue(&self, before_ms: u64) -> Vec<u64> {
        self.in_flight
            .iter()
            .filter(|(_, started, _)| *started < before_ms)
            .map(|(c, _, _)| *c)
            .collect()
    }

    /// How long until a call may leave: `None` when nothing can (nothing to send, or every
    /// call slot is taken and its answer will wake the queue).
    pub fn wake_in_ms(&self, now_ms: u64) -> Option<u64> {
        if self.in_flight.len() >= self.max_in_flight
            || (self.waiting.is_empty() && self.retry.is_empty())
        {
            return None;
        }
        Some(self.retry_at_ms.saturating_sub(now_ms))
    }
}

/// At most what a report takes on the wire (text counted as if every byte were escaped).
fn encoded_size(r: &Report) -> usize {
    descriptors_size(&r.descriptors) + spend_size(&r.spend)
}

fn pending_size(p: &Pending) -> usize {
    descriptors_size(&p.descriptors) + spend_size(&p.spend)
}

fn spend_size(spend: &[wire::Spend]) -> usize {
    spend
        .iter()
        .map(|s| 120 + s.model.as_ref().map_or(0, |m| 6 * m.len()))
        .sum()
}

fn descriptors_size(ds: &[Descriptor]) -> usize {
    300 + ds
        .iter()
        .map(|d| 64 + 6 * (d.limit.len() + d.value.len()) + 48 * d.rates.len())
        .sum::<usize>()
}

/// The pause after the `failures`-th failure in a row: 250 ms doubling up to 10 s.
pub fn backoff_ms(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_BACKOFF_MS << doublings).min(MAX_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;
    use std::collections::HashMap;

    fn d(value: &str) -> Descriptor {
        Descriptor {
            limit: "user".into(),
            value: value.into(),
            rates: vec![Rate {
                budget: 1000,
                window_s: 60,
                ..Default::default()
            }],
            shared: false,
            ..Default::default()
        }
    }

    fn spent(value: &str, tokens: u64, reserved: u64, at: Option<u64>) -> Spent {
        Spent {
            descriptors: vec![d(value)],
            used: Amount::tokens(tokens),
            reserved: Amount::tokens(reserved),
            reserved_at_ms: at,
            release: None,
            usage: UsageFigures {
                prompt_tokens: 0,
                completion_tokens: tokens,
                total_tokens: tokens,
                ..Default::default()
            },
            lease: None,
            request: true,
            model: None,
        }
    }

    fn queue(batch: usize) -> ReportQueue {
        ReportQueue::new(ReportIds::new(0xabc), batch, 2, 100)
    }

    fn ids(batch: &[&Report]) -> Vec<String> {
        batch.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn waiting_reports_for_the_same_key_merge() {
        let mut q = queue(10);
        for _ in 0..1000 {
            assert_eq!(q.push(spent("ann", 5, 0, None)), 0);
        }
        q.push(spent("bob", 7, 0, None));
        assert_eq!(q.len(), 2, "bounded by keys, not requests");
        let batch = q.start_batch(0, 1).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            (batch[0].used.tokens, batch[0].descriptors[0].value.as_str()),
            (5000, "ann")
        );
        assert_eq!(batch[0].usage.unwrap().completion_tokens, 5000);
        assert_eq!(batch[0].id, "0000000000000abc-1");
        assert_eq!(batch[1].used.tokens, 7);
    }

    #[test]
    fn reservations_settle_exactly_when_merged() {
        let mut q = queue(10);
        // Excess charged now; refunds of reservations taken in one second merge.
        q.push(spent("ann", 300, 100, Some(61_000)));
        q.push(spent("ann", 10, 100, Some(61_500)));
        q.push(spent("ann", 50, 100, Some(62_000)));
        q.push(spent("ann", 100, 100, Some(62_100)));
        let batch = q.start_batch(0, 1).unwrap();
        let parts: Vec<(u64, u64, Option<u64>)> = batch
            .iter()
            .map(|r| (r.used.tokens, r.reserved.tokens, r.reserved_at_ms))
            .collect();
        assert_eq!(
            parts,
            [(200, 0, None), (0, 90, Some(61_500)), (0, 50, Some(62_000))]
        );
    }

    #[test]
    fn an_exact_reservation_is_reported_only_for_the_ledger_and_alerts() {
        let mut q = queue(10);
        let mut lease_end = spent("ann", 100, 100, Some(1_000));
        lease_end.request = false;
        q.push(lease_end);
        assert!(q.is_empty(), "nothing to settle, no request served");
        let mut exact = spent("ann", 100, 100, Some(1_000));
        exact.model = Some("gpt-4o".into());
        q.push(exact);
        let batch = q.start_batch(0, 1).unwrap();
        assert_eq!(
            (batch[0].used, batch[0].reserved),
            (Amount::ZERO, Amount::ZERO)
        );
        let spend = batch[0].spend[0].clone();
        assert_eq!(
            (spend.model.as_deref(), spend.requests, spend.used),
            (Some("gpt-4o"), 1, Amount::tokens(100)),
            "the ledger hears of the whole use"
        );
        q.finish_batch(1, Delivery::Answered(Vec::new()), 0);
        let mut exact = spent("ann", 100, 100, Some(1_000));
        exact.descriptors[0].alerts = wire::Threshold::of(0.5).into_iter().collect();
        q.push(exact);
        let batch = q.start_batch(0, 1).unwrap();
        assert_eq!(batch.len(), 1, "the service raises alerts on reports");
        assert_eq!(
            (batch[0].used, batch[0].reserved),
            (Amount::ZERO, Amount::ZERO)
        );
        assert_eq!(batch[0].usage.unwrap().completion_tokens, 100);
    }

    #[test]
    fn in_flight_never_changes_and_retries_keep_their_ids() {
        let mut q = queue(10);
        q.push(spent("ann", 5, 0, None));
        let first = ids(&q.start_batch(0, 1).unwrap());
        q.push(spent("ann", 6, 0, None));
        let s = q.finish_batch(1, Delivery::Retry, 1000);
        assert_eq!(s.retried, 1);
        assert_eq!(q.wake_in_ms(1000), Some(250));
        assert!(q.start_batch(1100, 2).is_none(), "backoff");
        let again = q.start_batch(1250, 2).unwrap();
        assert_eq!(ids(&again), first);
        assert_eq!(
            again[0].used.tokens, 5,
            "the new report did not merge into a sealed one"
        );
        let s = q.finish_batch(2, Delivery::Answered(vec![Outcome::Duplicate]), 1300);
        assert_eq!((s.sent, s.tokens), (1, 5));
        q.push(spent("bob", 1, 0, None));
        let next = q.start_batch(1300, 3).unwrap();
        assert_eq!(
            (next[0].used.tokens, next[0].id.as_str()),
            (6, "0000000000000abc-2")
        );
    }

    #[test]
    fn an_outage_of_any_length_loses_nothing_within_the_key_bound() {
        let mut q = queue(10);
        let mut now = 0;
        let mut call = 0;
        for round in 0..10_000u64 {
            q.push(spent(&format!("u{}", round % 50), 1, 0, None));
            call += 1;
            if q.start_batch(now, call).is_some() {
                q.finish_batch(call, Delivery::Retry, now);
            }
            now += 100;
        }
        assert!(q.len() <= 50 + 10, "{}", q.len());
        // The service is back: everything arrives, exactly.
        let mut tokens = 0;
        now += 20_000;
        while let Some(batch) = q.start_batch(now, call + 1) {
            let n = batch.len();
            call += 1;
            tokens += q
                .finish_batch(call, Delivery::Answered(vec![Outcome::Applied; n]), now)
                .tokens;
        }
        assert_eq!(tokens, 10_000);
        assert!(q.is_empty());
    }

    #[test]
    fn past_the_key_bound_the_oldest_entry_is_dropped() {
        let mut q = ReportQueue::new(ReportIds::new(1), 10, 1, 3);
        for u in ["a", "b", "c"] {
            assert_eq!(q.push(spent(u, 1, 0, None)), 0);
        }
        assert_eq!(q.push(spent("d", 1, 0, None)), 1);
        assert_eq!(q.push(spent("d", 1, 0, None)), 0, "merges");
        assert_eq!(q.push(spent("e", 1, 0, None)), 1);
        assert_eq!(q.push(spent("f", 1, 0, None)), 1);
        assert_eq!(q.push(spent("g", 1, 0, None)), 2, "the two requests of d");
        let values: Vec<String> = q
            .start_batch(0, 1)
            .unwrap()
            .iter()
            .map(|r| r.descriptors[0].value.clone())
            .collect();
        assert_eq!(values, ["e", "f", "g"]);
    }

    #[test]
    fn one_refused_report_is_found_and_dropped_alone() {
        let mut q = queue(10);
        for u in ["a", "poison", "c"] {
            q.push(spent(u, 1, 0, None));
        }
        q.start_batch(0, 1).unwrap();
        assert_eq!(q.finish_batch(1, Delivery::Refused, 0).rejected, 0);
        let mut call = 1;
        let mut sent = Vec::new();
        while let Some(batch) = q.start_batch(0, call + 1) {
            call += 1;
            assert_eq!(batch.len(), 1, "sent alone");
            let value = batch[0].descriptors[0].value.clone();
            let d = if value == "poison" {
                Delivery::Refused
            } else {
                sent.push(value);
                Delivery::Answered(vec![])
            };
            q.finish_batch(call, d, 0);
        }
        assert_eq!(sent, ["a", "c"]);
        assert!(q.is_empty());
    }

    /// Limitador refuses a hit past a limit and says nothing of what remains: the queue
    /// halves its way to what fits, so the counter ends exactly at its limit, within about
    /// log2 of the report's tokens in calls, whatever the room left and the report's size.
    #[test]
    fn a_refused_report_halves_its_way_to_what_fits() {
        for (used, limit, tokens, reserved) in [
            (91, 100, 30, 1),
            (0, 100, 1_000, 0),
            (99, 100, 50, 0),
            (100, 100, 7, 0),
            (0, 1_000_000, 4_000_000, 17),
            (12_345, 65_536, 1 << 20, 0),
        ] {
            let mut q = ReportQueue::new(ReportIds::new(1), 1, 8, 100);
            q.push(spent("ann", tokens, reserved, None));
            let mut counter = used;
            let (mut calls, mut over) = (0, 0);
            let mut call = 0;
            while let Some(batch) = q.start_batch(0, call + 1) {
                call += 1;
                calls += 1;
                let hits = (batch[0].used.tokens - batch[0].reserved.tokens).max(1);
                let delivery = if counter + hits > limit {
                    Delivery::OverLimit { fits: None }
                } else {
                    counter += hits;
                    Delivery::Answered(vec![])
                };
                over += q.finish_batch(call, delivery, 0).over_limit;
            }
            let add = tokens - reserved;
            assert_eq!(counter, limit.min(used + add), "{used}/{limit} + {add}");
            assert_eq!(over, (used + add).saturating_sub(limit), "uncounted");
            let log2 = 64 - add.leading_zeros();
            assert!(calls <= u64::from(log2) + 2, "{calls} calls for {add}");
            assert!(q.is_empty());
        }
    }

    /// Limitador refuses a hit for several counters whole when one is over: each counter is
    /// then settled apart, so a team's budget is charged the overrun a user's limit refused.
    /// An engine that keeps naming more room than it takes cannot make the search long.
    #[test]
    fn a_refused_report_for_several_counters_settles_each() {
        let mut q = ReportQueue::new(ReportIds::new(1), 1, 8, 100);
        let mut s = spent("ann", 29, 0, None);
        s.descriptors.push(d("team"));
        q.push(s);
        // Used so far, and limits: ann 91 of 100, the team 500 of 1000.
        let mut used: HashMap<String, u64> = [("ann".into(), 91), ("team".into(), 500)].into();
        let limit = |v: &str| if v == "ann" { 100 } else { 1000 };
        let (mut call, mut over, mut sent) = (0, 0, 0);
        while let Some(batch) = q.start_batch(0, call + 1) {
            call += 1;
            assert!(call < 20, "bounded");
            let hits = batch[0].used.tokens - batch[0].reserved.tokens;
            let values: Vec<String> = batch[0]
                .descriptors
                .iter()
                .map(|d| d.value.clone())
                .collect();
            let fits = values.iter().all(|v| used[v] + hits <= limit(v));
            let delivery = if fits {
                for v in &values {
                    *used.get_mut(v).unwrap() += hits;
                }
                Delivery::Answered(vec![])
            } else {
                Delivery::OverLimit { fits: None }
            };
            let s = q.finish_batch(call, delivery, 0);
            (over, sent) = (over + s.over_limit, sent + s.sent);
        }
        assert_eq!((used["ann"], used["team"]), (100, 529));
        assert_eq!(over, 20, "what ann's limit could not record");
        assert_eq!(sent, 1, "one request");

        // An engine that always names one token less than it was sent, and refuses it.
        let mut q = ReportQueue::new(ReportIds::new(1), 1, 8, 100);
        q.push(spent("bob", 50_000, 0, None));
        let mut calls = 0;
        while let Some(batch) = q.start_batch(0, calls + 1) {
            calls += 1;
            let fits = Some(batch[0].used.tokens - 1);
            q.finish_batch(calls, Delivery::OverLimit { fits }, 0);
        }
        assert!(calls <= 20, "{calls} calls");
    }

    #[test]
    fn a_report_refused_past_the_limit_is_sent_again_with_what_fits() {
        let mut q = ReportQueue::new(ReportIds::new(1), 1, 8, 100);
        q.push(spent("ann", 29, 0, None));
        q.start_batch(0, 1).unwrap();
        let s = q.finish_batch(1, Delivery::OverLimit { fits: Some(9) }, 0);
        assert_eq!(s.over_limit, 20);
        let again = q.start_batch(0, 2).unwrap();
        assert_eq!(again[0].used.tokens, 9);
        let s = q.finish_batch(2, Delivery::Answered(vec![]), 0);
        assert_eq!(s.sent, 1);
        assert!(q.is_empty());
        // Nothing fits: the limit is spent already; nothing more to send.
        q.push(spent("bob", 5, 0, None));
        q.start_batch(0, 3).unwrap();
        let s = q.finish_batch(3, Delivery::OverLimit { fits: Some(0) }, 0);
        assert_eq!((s.over_limit, s.sent), (5, 1));
        assert!(q.is_empty());
    }

    #[test]
    fn per_report_outcomes() {
        let mut q = queue(10);
        for u in ["a", "b", "c"] {
            q.push(spent(u, 1, 0, None));
        }
        q.start_batch(0, 1).unwrap();
        let s = q.finish_batch(
            1,
            Delivery::Answered(vec![Outcome::Applied, Outcome::Rejected, Outcome::Retry]),
            0,
        );
        assert_eq!((s.sent, s.rejected, s.retried), (1, 1, 1));
        let again = q.start_batch(1000, 2).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].descriptors[0].value, "c");
    }

    #[test]
    fn several_calls_fly_at_once_and_ids_stay_within_the_window() {
        let mut q = ReportQueue::new(ReportIds::new(1), 1, 4, 100_000);
        for i in 0..10 {
            q.push(spent(&i.to_string(), 1, 0, None));
        }
        for call in 1..=4 {
            assert!(q.start_batch(0, call).is_some());
        }
        assert!(q.start_batch(0, 5).is_none(), "four in flight");
        assert_eq!(q.wake_in_ms(0), None);
        // One report keeps failing while the others go through: new ids stop before they
        // would leave the service's window.
        q.finish_batch(1, Delivery::Retry, 0);
        for i in 0..20_000 {
            q.push(spent(&format!("x{i}"), 1, 0, None));
        }
        let mut call = 100;
        let mut highest = 0;
        loop {
            call += 1;
            let Some(batch) = q.start_batch(0, call) else {
                break;
            };
            let seq = SeqId::parse(&batch[0].id).unwrap().seq;
            if batch[0].descriptors[0].value == "0" {
                // The failing one, held back by its backoff only until the next attempt.
                q.finish_batch(call, Delivery::Retry, 0);
                break;
            }
            highest = highest.max(seq);
            q.finish_batch(call, Delivery::Answered(vec![]), 0);
        }
        assert!(highest < 1 + wire::REPORT_WINDOW, "{highest}");
        assert!(!q.is_empty());
    }

    #[test]
    fn batches_stay_within_what_the_service_reads() {
        let mut q = ReportQueue::new(ReportIds::new(1), BATCH, 1, 1000);
        let big = Descriptor {
            limit: "\u{1}".repeat(wire::MAX_TEXT),
            value: "\u{1}".repeat(256),
            rates: vec![],
            shared: false,
            ..Default::default()
        };
        for i in 0..BATCH {
            let mut s = spent(&i.to_string(), 1, 0, None);
            s.descriptors = vec![big.clone(); wire::MAX_DESCRIPTORS - 1];
            s.descriptors.push(d(&i.to_string()));
            q.push(s);
        }
        let mut call = 0;
        while let Some(batch) = q.start_batch(0, call) {
            let body = serde_json::to_vec(&wire::ReportRequest { reports: batch }).unwrap();
            assert!(body.len() <= wire::MAX_BODY_BYTES, "{}", body.len());
            q.finish_batch(call, Delivery::Answered(vec![]), 0);
            call += 1;
        }
        assert!(q.is_empty());
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let delays: Vec<u64> = (1..=8).map(backoff_ms).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(backoff_ms(u32::MAX), 10_000);
    }

    /// A deterministic pseudo-random sequence (xorshift), so a failure can be replayed.
    struct Dice(u64);

    impl Dice {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Whatever the order of pushes, answers, failures and retries: a sealed report never
    /// changes, the service (which applies an id once) ends up charging exactly what was
    /// pushed, per key and per reservation second, and nothing is left behind.
    #[test]
    fn every_token_pushed_is_delivered_exactly_once_whatever_happens() {
        for seed in 1..=40u64 {
            let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut q = ReportQueue::new(
                ReportIds::new(seed),
                1 + dice.next(20) as usize,
                1 + dice.next(4) as usize,
                1000,
            );
            let mut pushed: HashMap<(String, Option<u64>), (u64, u64)> = HashMap::new();
            let mut applied: HashMap<String, Report> = HashMap::new();
            let mut charged: HashMap<(String, Option<u64>), (u64, u64)> = HashMap::new();
            let mut flying: Vec<u64> = Vec::new();
            let (mut now, mut call) = (0u64, 0u64);
            let mut deliver = |q: &mut ReportQueue,
                               call: u64,
                               flying: &mut Vec<u64>,
                               dice: &mut Dice,
                               now: u64,
                               all_good: bool| {
                flying.retain(|c| *c != call);
                let outcome = if all_good { 0 } else { dice.next(5) };
                let d = match outcome {
                    0 | 1 => Delivery::Answered(Vec::new()),
                    // Applied, but the answer was lost (a timeout after the service acted).
                    2 | 3 => Delivery::Retry,
                    // Some applied, some told to retry (the store failed in the middle).
                    _ => Delivery::Answered(vec![Outcome::Applied, Outcome::Retry, Outcome::Retry]),
                };
                let lost_answer = outcome == 2;
                // What the service does with what was sent: apply each id once.
                if let Some((_, _, batch)) = q.in_flight.iter().find(|(c, _, _)| *c == call) {
                    for (j, sealed) in batch.iter().enumerate() {
                        let applies = match &d {
                            Delivery::Answered(o) => !matches!(o.get(j), Some(Outcome::Retry)),
                            _ => lost_answer,
                        };
                        let r = &sealed.report;
                        if let Some(before) = applied.get(&r.id) {
                            assert_eq!(before, r, "a sealed report never changes");
                            continue;
                        }
                        if applies {
                            applied.insert(r.id.clone(), r.clone());
                            let key = (
                                r.descriptors[0].value.clone(),
                                r.reserved_at_ms.map(|t| t / 1000),
                            );
                            let e = charged.entry(key).or_default();
                            e.0 += r.used.tokens;
                            e.1 += r.reserved.tokens;
                        }
                    }
                }
                q.finish_batch(call, d, now);
            };
            for _ in 0..3000 {
                match dice.next(5) {
                    0 | 1 => {
                        let user = format!("u{}", dice.next(12));
                        let (tokens, reserved) = (dice.next(50), dice.next(3) * 20);
                        let at = (reserved > 0).then(|| 1000 * dice.next(5) + dice.next(1000));
                        let excess = tokens.saturating_sub(reserved);
                        let refund = reserved.saturating_sub(tokens);
                        if excess > 0 {
                            pushed.entry((user.clone(), None)).or_default().0 += excess;
                        }
                        if refund > 0 {
                            pushed
                                .entry((user.clone(), at.map(|t| t / 1000)))
                                .or_default()
                                .1 += refund;
                        }
                        assert_eq!(q.push(spent(&user, tokens, reserved, at)), 0);
                    }
                    2 => {
                        call += 1;
                        if q.start_batch(now, call).is_some() {
                            flying.push(call);
                        }
                    }
                    3 => {
                        if !flying.is_empty() {
                            let c = flying[dice.next(flying.len() as u64) as usize];
                            deliver(&mut q, c, &mut flying, &mut dice, now, false);
                        }
                    }
                    _ => now += dice.next(3000),
                }
            }
            // The service is healthy again: everything drains.
            for _ in 0..100_000 {
                if q.is_empty() {
                    break;
                }
                now += 10_000;
                while let Some(c) = flying.first().copied() {
                    deliver(&mut q, c, &mut flying, &mut dice, now, true);
                }
                call += 1;
                if q.start_batch(now, call).is_some() {
                    flying.push(call);
                }
            }
            assert!(q.is_empty(), "seed {seed}: {} left", q.len());
            pushed.retain(|_, v| *v != (0, 0));
            assert_eq!(charged, pushed, "seed {seed}");
        }
    }
}
