//! Usage reports on their way to the service: a bounded queue, batches, retries with backoff.
//!
//! The root context owns one queue per VM. HTTP streams only push; the root sends one batch at
//! a time and settles it from the answer. A report keeps its id across retries, so the service
//! (which ignores an id it has applied) never charges it twice.

use std::collections::VecDeque;

/// The most reports waiting per VM; past it new reports are dropped and counted. A report is a
/// few hundred bytes, so the queue stays within a couple of megabytes.
pub const CAPACITY: usize = 4096;
/// The most reports in one `/v1/report` call.
pub const BATCH: usize = 100;
/// Attempts before a report is given up: with the backoff below, about 100 seconds of outage.
pub const MAX_ATTEMPTS: u32 = 16;
const FIRST_BACKOFF_MS: u64 = 250;
const MAX_BACKOFF_MS: u64 = 10_000;

pub use wire::Report;

/// Makes report ids: a per-VM random prefix and a sequence number.
pub struct ReportIds {
    prefix: String,
    next: u64,
}

impl ReportIds {
    pub fn new(seed: u64) -> ReportIds {
        ReportIds {
            prefix: format!("{seed:016x}"),
            next: 0,
        }
    }

    pub fn next_id(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next)
    }
}

/// How a report call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Accepted,
    /// The service was unreachable, slow or failing: try again later.
    Retry,
    /// The service refused the reports as malformed: retrying cannot help.
    Rejected,
}

/// Reads a report call's status (`None`: no response headers).
pub fn delivery(status: Option<u32>) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Accepted,
        Some(408 | 429) | Some(500..) | None => Delivery::Retry,
        Some(_) => Delivery::Rejected,
    }
}

/// Reads a report call's gRPC status: INVALID_ARGUMENT and UNIMPLEMENTED cannot get better.
pub fn grpc_delivery(status: u32) -> Delivery {
    match status {
        0 => Delivery::Accepted,
        3 | 12 => Delivery::Rejected,
        _ => Delivery::Retry,
    }
}

/// What settling a batch did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub sent: u64,
    pub tokens: u64,
    pub retried: u64,
    /// Given up: refused by the service, or out of attempts.
    pub failed: u64,
}

struct Queued {
    report: Report,
    attempts: u32,
}

/// See the module documentation.
pub struct ReportQueue {
    waiting: VecDeque<Queued>,
    in_flight: Vec<Queued>,
    /// No batch leaves before this time (backoff after a failure).
    retry_at_ms: u64,
    batch: usize,
}

impl ReportQueue {
    /// `batch`: the most reports per call (1 for protocols that take one at a time).
    pub fn new(batch: usize) -> ReportQueue {
        ReportQueue {
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
            retry_at_ms: 0,
            batch: batch.clamp(1, BATCH),
        }
    }

    /// Changes the batch size (a new configuration may speak another protocol).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.clamp(1, BATCH);
    }

    /// Queues a report; `false` when the queue is full and the report is dropped.
    pub fn push(&mut self, report: Report) -> bool {
        if self.waiting.len() + self.in_flight.len() >= CAPACITY {
            return false;
        }
        self.waiting.push_back(Queued {
            report,
            attempts: 0,
        });
        true
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the next batch when one may leave now; the reports to send.
    pub fn start_batch(&mut self, now_ms: u64) -> Option<Vec<&Report>> {
        if !self.in_flight.is_empty() || self.waiting.is_empty() || now_ms < self.retry_at_ms {
            return None;
        }
        // Never more than the service reads in one body, whatever the reports hold.
        let mut bytes = 0;
        let n = self
            .waiting
            .iter()
            .take(self.batch)
            .take_while(|q| {
                bytes += encoded_size(&q.report);
                bytes <= BATCH_BYTES
            })
            .count()
            .max(1);
        self.in_flight.extend(self.waiting.drain(..n));
        Some(self.in_flight.iter().map(|q| &q.report).collect())
    }

    /// The batch in flight could not even be dispatched, or its call ended: settle it.
    pub fn finish_batch(&mut self, delivery: Delivery, now_ms: u64) -> Settled {
        let batch = std::mem::take(&mut self.in_flight);
        let mut settled = Settled::default();
        match delivery {
            Delivery::Accepted => {
                settled.sent = batch.len() as u64;
                settled.tokens = batch.iter().map(|q| q.report.tokens).sum();
            }
            Delivery::Rejected => settled.failed = batch.len() as u64,
            Delivery::Retry => {
                let mut first_attempts = u32::MAX;
                for mut q in batch.into_iter().rev() {
                    q.attempts += 1;
                    if q.attempts >= MAX_ATTEMPTS {
                        settled.failed += 1;
                    } else {
                        settled.retried += 1;
                        first_attempts = first_attempts.min(q.attempts);
                        self.waiting.push_front(q);
                    }
                }
                if settled.retried > 0 {
                    self.retry_at_ms = now_ms.saturating_add(backoff_ms(first_attempts));
                }
            }
        }
        settled
    }

    /// How long until a batch may leave: `None` when nothing waits or a batch is in flight
    /// (its answer wakes the queue).
    pub fn wake_in_ms(&self, now_ms: u64) -> Option<u64> {
        if !self.in_flight.is_empty() || self.waiting.is_empty() {
            return None;
        }
        Some(self.retry_at_ms.saturating_sub(now_ms))
    }
}

/// The most bytes of reports in one call: half of what the service reads.
const BATCH_BYTES: usize = wire::MAX_BODY_BYTES / 2;

/// At most what a report takes on the wire (text counted as if every byte were escaped).
fn encoded_size(r: &Report) -> usize {
    200 + r
        .descriptors
        .iter()
        .map(|d| 64 + 6 * (d.limit.len() + d.value.len()) + 48 * d.rates.len())
        .sum::<usize>()
}

/// The pause after the `attempts`-th failure: 250 ms doubling up to 10 s.
pub fn backoff_ms(attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(16);
    (FIRST_BACKOFF_MS << doublings).min(MAX_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ids: &mut ReportIds, tokens: u64) -> Report {
        Report {
            id: ids.next_id(),
            descriptors: Vec::new(),
            tokens,
            reserved: 0,
            reserved_at_ms: None,
            release: false,
            usage: None,
        }
    }

    #[test]
    fn ids_are_unique_and_prefixed() {
        let mut ids = ReportIds::new(0xabc);
        assert_eq!(ids.next_id(), "0000000000000abc-1");
        assert_eq!(ids.next_id(), "0000000000000abc-2");
    }

    #[test]
    fn batches_one_at_a_time() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(2);
        for t in [1, 2, 3] {
            assert!(q.push(report(&mut ids, t)));
        }
        assert_eq!(q.wake_in_ms(0), Some(0));
        let batch: Vec<u64> = q.start_batch(0).unwrap().iter().map(|r| r.tokens).collect();
        assert_eq!(batch, [1, 2]);
        assert!(q.start_batch(0).is_none(), "one batch in flight at a time");
        assert_eq!(q.wake_in_ms(0), None);
        let s = q.finish_batch(Delivery::Accepted, 0);
        assert_eq!((s.sent, s.tokens), (2, 3));
        assert_eq!(q.start_batch(0).unwrap().len(), 1);
        q.finish_batch(Delivery::Accepted, 0);
        assert!(q.is_empty() && q.wake_in_ms(0).is_none());
    }

    #[test]
    fn retries_keep_order_and_ids_then_give_up() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(10);
        q.push(report(&mut ids, 1));
        q.push(report(&mut ids, 2));
        let first: Vec<String> = q
            .start_batch(0)
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect();
        let s = q.finish_batch(Delivery::Retry, 1000);
        assert_eq!((s.retried, s.failed), (2, 0));
        assert_eq!(q.wake_in_ms(1000), Some(250));
        assert!(q.start_batch(1100).is_none());
        let again: Vec<String> = q
            .start_batch(1250)
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(first, again);
        let mut now = 1250;
        let mut failed = 0;
        for _ in 1..MAX_ATTEMPTS {
            failed += q.finish_batch(Delivery::Retry, now).failed;
            now += q.wake_in_ms(now).unwrap_or(0);
            q.start_batch(now);
        }
        assert_eq!(failed, 2);
        assert!(q.is_empty());
    }

    #[test]
    fn the_batch_size_follows_the_protocol() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(BATCH);
        for _ in 0..3 {
            q.push(report(&mut ids, 1));
        }
        q.set_batch(1);
        assert_eq!(q.start_batch(0).unwrap().len(), 1);
    }

    #[test]
    fn batches_stay_within_what_the_service_reads() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(BATCH);
        let big = wire::Descriptor {
            limit: "\u{1}".repeat(wire::MAX_TEXT),
            value: "\u{1}".repeat(256),
            rates: vec![],
            shared: false,
        };
        for _ in 0..BATCH {
            let mut r = report(&mut ids, 1);
            r.descriptors = vec![big.clone(); wire::MAX_DESCRIPTORS];
            q.push(r);
        }
        while let Some(batch) = q.start_batch(0) {
            let body = serde_json::to_vec(&wire::ReportRequest { reports: batch }).unwrap();
            assert!(body.len() <= wire::MAX_BODY_BYTES, "{}", body.len());
            q.finish_batch(Delivery::Accepted, 0);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn rejected_batches_are_dropped() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(10);
        q.push(report(&mut ids, 1));
        q.start_batch(0);
        assert_eq!(q.finish_batch(Delivery::Rejected, 0).failed, 1);
        assert!(q.is_empty());
    }

    #[test]
    fn bounded() {
        let mut ids = ReportIds::new(1);
        let mut q = ReportQueue::new(10);
        for _ in 0..CAPACITY {
            assert!(q.push(report(&mut ids, 1)));
        }
        assert!(!q.push(report(&mut ids, 1)));
        assert_eq!(q.len(), CAPACITY);
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let delays: Vec<u64> = (1..=8).map(backoff_ms).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(backoff_ms(u32::MAX), 10_000);
        let total: u64 = (1..MAX_ATTEMPTS).map(backoff_ms).sum();
        assert!((90_000..120_000).contains(&total), "{total}");
    }

    #[test]
    fn statuses() {
        assert_eq!(delivery(Some(200)), Delivery::Accepted);
        assert_eq!(delivery(None), Delivery::Retry);
        assert_eq!(delivery(Some(503)), Delivery::Retry);
        assert_eq!(delivery(Some(429)), Delivery::Retry);
        assert_eq!(delivery(Some(400)), Delivery::Rejected);
        assert_eq!(delivery(Some(413)), Delivery::Rejected);
    }
}
