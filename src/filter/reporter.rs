//! The root context's side of reporting: owns the VM's report queue and sends its batches.
//!
//! HTTP streams hand their report over in `on_log` and wake the root context through its
//! timer; the root dispatches one batch at a time and settles it from the answer. Callouts are
//! made from the root context only, because Envoy cancels an HTTP context's callouts when its
//! stream ends.

use super::host;
use super::metrics::Metrics;
use crate::config::{Protocol, ServiceConfig};
use crate::protocol::report_call;
use crate::report::{delivery, grpc_delivery, Delivery, Report, ReportIds, ReportQueue, BATCH};

/// A report call may carry a hundred reports: give it more time than a check.
const MIN_REPORT_TIMEOUT_MS: u64 = 2000;

pub struct Reporter {
    queue: ReportQueue,
    ids: ReportIds,
    service: ServiceConfig,
    /// The timer is armed (or a batch is in flight and its answer will pump the queue).
    scheduled: bool,
}

/// Reports per call: protocol v1 takes many, the others one request's usage each.
fn batch_size(protocol: Protocol) -> usize {
    match protocol {
        Protocol::V1 => BATCH,
        Protocol::Asm | Protocol::EnvoyRls => 1,
    }
}

impl Reporter {
    pub fn new(service: ServiceConfig) -> Reporter {
        Reporter {
            queue: ReportQueue::new(batch_size(service.protocol)),
            ids: ReportIds::new(host::random_seed()),
            service,
            scheduled: false,
        }
    }

    /// A new configuration: later reports go to the new service; queued ones follow them.
    pub fn reconfigure(&mut self, service: ServiceConfig) {
        self.queue.set_batch(batch_size(service.protocol));
        self.service = service;
    }

    pub fn next_id(&mut self) -> String {
        self.ids.next_id()
    }

    /// Queues a report (from an HTTP context) and wakes the root context.
    pub fn submit(&mut self, report: Report, metrics: &Metrics) {
        if !self.queue.push(report) {
            metrics.reports_dropped.inc();
            log::warn!("report queue full: a usage report was dropped");
        }
        metrics.report_queue.set(self.queue.len() as u64);
        if !self.scheduled {
            self.scheduled = true;
            host::set_tick_ms(1);
        }
    }

    /// Sends the next batch if one may leave, and arms the timer for the one after.
    /// Runs in the root context (on its tick, or on a report call's answer).
    pub fn pump(&mut self, metrics: &Metrics) {
        let now = host::now_ms();
        loop {
            let call = match self.queue.start_batch(now) {
                None => break,
                Some(batch) => report_call(&self.service, &batch),
            };
            let Some(call) = call else {
                // Nothing to add (an RLS report of a fully reserved request).
                self.settle(Delivery::Accepted, metrics);
                continue;
            };
            let timeout = self.service.timeout_ms.max(MIN_REPORT_TIMEOUT_MS);
            if let Err(status) = host::dispatch_outbound(&self.service, &call, timeout) {
                log::warn!(
                    "report could not be dispatched to cluster `{}`: {status:?}",
                    self.service.cluster
                );
                self.settle(Delivery::Retry, metrics);
            }
            break;
        }
        let wake = self.queue.wake_in_ms(host::now_ms());
        host::set_tick_ms(wake.map_or(0, |ms| ms.max(1)));
        self.scheduled = wake.is_some() || !self.queue.is_empty();
    }

    /// The answer to the batch in flight: an HTTP status, or for `envoy-rls` a gRPC status.
    pub fn answered(&mut self, status: Option<u32>, metrics: &Metrics) {
        let outcome = match self.service.protocol {
            Protocol::EnvoyRls => grpc_delivery(status.unwrap_or(14)),
            Protocol::V1 | Protocol::Asm => delivery(status),
        };
        if outcome != Delivery::Accepted {
            log::warn!("usage report failed: status {status:?}");
        }
        self.settle(outcome, metrics);
        self.pump(metrics);
    }

    fn settle(&mut self, outcome: Delivery, metrics: &Metrics) {
        let s = self.queue.finish_batch(outcome, host::now_ms());
        metrics.reports_sent.add(s.sent);
        metrics.tokens_reported.add(s.tokens);
        metrics.reports_retried.add(s.retried);
        metrics.reports_failed.add(s.failed);
        metrics.report_queue.set(self.queue.len() as u64);
    }
}
