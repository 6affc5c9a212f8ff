//! The root contexts' side of reporting: the VM's one report queue and the calls that empty it,
//! and the asks for the VM's quota leases (sent in the background, like reports).
//!
//! HTTP streams hand over what their request spent in `on_log` and wake a root context through
//! its timer; a root context dispatches calls (several may be in flight) and settles each from
//! its answer, matched by callout token. Callouts are made from root contexts only, because Envoy
//! cancels an HTTP context's callouts when its stream ends. The queue belongs to the VM, not to a
//! root context, so a new configuration (a new root context) takes it over; a call whose root
//! context is gone is settled as failed after its deadline and sent again with its ids.

use std::cell::RefCell;
use std::rc::Rc;

use super::host::Host;
use super::metrics::Metrics;
use crate::config::ServiceConfig;
use crate::lease::{Figures, Leases};
use crate::report::{Delivery, ReportIds, ReportQueue, Settled, Spent};

/// A report call may carry a hundred reports: give it more time than a check.
const MIN_REPORT_TIMEOUT_MS: u64 = 2000;

/// Every root context ticks at least this often, so whichever is alive sends what is queued
/// (a root context replaced by a new configuration may leave reports behind).
pub const HEARTBEAT_MS: u64 = 1000;

/// Whether two configurations name the same service.
fn same_service(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    (&a.cluster, &a.authority, a.protocol) == (&b.cluster, &b.authority, b.protocol)
}

/// A call in flight: the queue's number for it (or the lease ask it is: its id and when it
/// left), the root context that made it, its token.
struct Flight {
    call: u64,
    lease: Option<(String, u64)>,
    root: u32,
    token: u32,
}

pub struct Reporter {
    host: Rc<dyn Host>,
    queue: ReportQueue,
    /// Ids for checks that reserve (a release names them), apart from report ids.
    checks: ReportIds,
    service: ServiceConfig,
    flights: Vec<Flight>,
    leases: Rc<RefCell<Leases>>,
    next_call: u64,
    /// The root context whose timer is armed, if any.
    ticking: Option<u32>,
    /// The service's clock less this VM's, as the last check answer showed it: a release
    /// (whose check was never answered) says when its reservation was taken in the service's
    /// time, so its refund settles in that window.
    pub service_offset_ms: Option<i64>,
}

impl Reporter {
    pub fn new(
        host: Rc<dyn Host>,
        service: ServiceConfig,
        capacity: usize,
        leases: Rc<RefCell<Leases>>,
    ) -> Reporter {
        let seed = host.random_seed();
        let (batch, in_flight) = service.protocol.wire().batching();
        Reporter {
            host,
            queue: ReportQueue::new(ReportIds::new(seed), batch, in_flight, capacity),
            checks: ReportIds::new(seed),
            service,
            flights: Vec::new(),
            leases,
            next_call: 0,
            ticking: None,
            service_offset_ms: None,
        }
    }

    /// A new configuration: later reports go to the new service; queued ones follow them.
    pub fn reconfigure(&mut self, service: ServiceConfig, capacity: usize) {
        let (batch, in_flight) = service.protocol.wire().batching();
        // Another service: the leases of the old one must not admit for the new one.
        if !same_service(&self.service, &service) {
            if let Ok(mut leases) = self.leases.try_borrow_mut() {
                leases.forget();
            }
        }
        self.queue.resize(batch, in_flight, capacity);
        self.service = service;
    }

    /// The id a reserving check is sent with.
    pub fn next_check_id(&mut self) -> String {
        self.checks.next_id()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues what a request spent (from an HTTP context of root context `root`) and wakes
    /// that root context unless a timer is armed already.
    pub fn submit(&mut self, spent: Spent, root: u32, metrics: &Metrics) {
        let dropped = self.queue.push(spent);
        if dropped > 0 {
            metrics.reports_dropped.add(dropped);
            log::warn!("report queue full of distinct keys: {dropped} waiting report(s) dropped");
        }
        // A call in flight pumps the queue when it is answered (the gauge is set there too).
        if self.ticking.is_none() && !self.queue.flights_full() {
            self.ticking = Some(root);
            self.host.set_tick_ms(1);
        }
    }

    /// Whether calls go to `service` (leases are asked of the service reports go to; a
    /// configuration of the VM that names another is checked, never leased).
    pub fn serves(&self, service: &ServiceConfig) -> bool {
        same_service(&self.service, service)
    }

    /// A lease ask is due: root context `root` sends it on its next tick.
    pub fn wake(&mut self, root: u32) {
        self.ticking = Some(root);
        self.host.set_tick_ms(1);
    }

    /// A root context is gone: its timer no longer runs, and its calls will not be answered.
    pub fn forget_root(&mut self, root: u32) {
        if self.ticking == Some(root) {
            self.ticking = None;
        }
    }

    /// Sends what may leave now, from root context `root`, and arms its timer for what
    /// follows. Runs on a root context's tick or on a report call's answer.
    pub fn pump(&mut self, root: u32, metrics: &Metrics) {
        let timeout = self.service.timeout_ms.max(MIN_REPORT_TIMEOUT_MS);
        let now = self.host.now_ms();
        let given_up = now.saturating_sub(2 * timeout + 1000);
        for call in self.queue.overdue(given_up) {
            log::warn!("a usage report call was never answered; it will be sent again");
            self.flights.retain(|f| f.call != call);
            self.settle(call, Delivery::Retry, metrics);
        }
        self.lease(root, now, given_up, metrics);
        metrics.report_queue.set(self.queue.len() as u64);
        loop {
            self.next_call += 1;
            let call_number = self.next_call;
            let outbound = match self.queue.start_batch(now, call_number) {
                None => break,
                Some(batch) => self
                    .service
                    .protocol
                    .wire()
                    .report_call(&self.service, &batch),
            };
            let Some(outbound) = outbound else {
                // Nothing to add (an RLS report of a fully reserved request).
                self.settle(call_number, Delivery::Answered(Vec::new()), metrics);
                continue;
            };
            match self.host.dispatch(&self.service, &outbound, timeout) {
                Ok(token) => self.flights.push(Flight {
                    call: call_number,
                    lease: None,
                    root,
                    token,
                }),
                Err(status) => {
                    log::warn!(
                        "report could not be dispatched to cluster `{}`: {status:?}",
                        self.service.cluster
                    );
                    self.settle(call_number, Delivery::Retry, metrics);
                    break;
                }
            }
        }
        match self.queue.wake_in_ms(self.host.now_ms()) {
            Some(ms) => {
                self.host.set_tick_ms(ms.max(1));
                self.ticking = Some(root);
            }
            // Nothing can leave now: the heartbeat looks at calls whose answer never comes, and
            // at reports another root context left behind.
            None => {
                self.host.set_tick_ms(HEARTBEAT_MS);
                self.ticking = None;
            }
        }
    }

    /// Ends leases whose time is up (giving back what they did not use), gives up asks never
    /// answered (releasing them), and sends the asks that are due.
    fn lease(&mut self, root: u32, now: u64, given_up: u64, metrics: &Metrics) {
        let Ok(mut leases) = self.leases.try_borrow_mut() else {
            return;
        };
        let mut reports = leases.expire(now, false);
        let lost = |f: &Flight| f.lease.as_ref().is_some_and(|(_, sent)| *sent < given_up);
        for flight in self.flights.iter().filter(|f| lost(f)) {
            log::warn!("a quota lease ask was never answered; it is released");
            metrics.leases_failed.inc();
            let id = flight.lease.as_ref().map_or("", |(id, _)| id.as_str());
            reports.extend(leases.failed(id, now, self.service_offset_ms.unwrap_or(0)));
        }
        self.flights.retain(|f| !lost(f));
        let checks = &mut self.checks;
        let asks = match self.service.leases {
            true => leases.asks(now, || checks.next_id()),
            false => Vec::new(),
        };
        for ask in asks {
            let Some(call) = self.service.protocol.wire().lease_call(&ask) else {
                leases.failed(&ask.id, now, 0);
                continue;
            };
            match self
                .host
                .dispatch(&self.service, &call, self.service.timeout_ms)
            {
                Ok(token) => self.flights.push(Flight {
                    call: 0,
                    lease: Some((ask.id, now)),
                    root,
                    token,
                }),
                // It never left: nothing to release; the key is checked for a while.
                Err(status) => {
                    log::warn!("a quota lease ask could not be dispatched: {status:?}");
                    metrics.leases_failed.inc();
                    leases.failed(&ask.id, now, 0);
                }
            }
        }
        metrics.leases_held.set(leases.held() as u64);
        drop(leases);
        for spent in reports {
            self.queue.push(spent);
        }
    }

    /// The answer to a lease ask: the lease is installed (the one it replaces ends), or the
    /// key is checked for a while; an ask without a readable answer is released.
    fn lease_answered(&mut self, id: &str, status: Option<u32>, body: &[u8], metrics: &Metrics) {
        let now = self.host.now_ms();
        let Ok(mut leases) = self.leases.try_borrow_mut() else {
            return;
        };
        let report = match self.service.protocol.wire().read_check(status, body) {
            Ok(v) => {
                let granted = v.allowed && v.lease.is_some_and(|l| l.granted.is_some());
                if granted {
                    metrics.leases_granted.inc();
                } else {
                    metrics.leases_declined.inc();
                }
                let figures = Figures {
                    quota: v.quota,
                    money: v.spend,
                };
                leases.answered(id, v.allowed, v.lease, figures, now)
            }
            Err(kind) => {
                log::warn!(
                    "quota lease ask failed ({}): status {status:?}",
                    kind.name()
                );
                metrics.leases_failed.inc();
                leases.failed(id, now, self.service_offset_ms.unwrap_or(0))
            }
        };
        metrics.leases_held.set(leases.held() as u64);
        drop(leases);
        if let Some(spent) = report {
            self.queue.push(spent);
        }
    }

    /// The VM is stopping: every lease ends now, and what they did not use is queued to be
    /// given back.
    pub fn end_leases(&mut self) {
        let offset = self.service_offset_ms.unwrap_or(0);
        let ends = match self.leases.try_borrow_mut() {
            Ok(mut leases) => leases.stop(self.host.now_ms(), offset),
            Err(_) => Vec::new(),
        };
        for spent in ends {
            self.queue.push(spent);
        }
    }

    /// The VM is stopping: sends everything that may leave now, backoff or not.
    pub fn flush(&mut self, root: u32, metrics: &Metrics) {
        self.queue.skip_backoff();
        self.pump(root, metrics);
    }

    /// The answer to call `token` of root context `root`: an HTTP status and body, or for
    /// `envoy-rls` a gRPC status. An answer to no call of ours is ignored: `false`.
    pub fn answered(
        &mut self,
        root: u32,
        token: u32,
        status: Option<u32>,
        body: &[u8],
        metrics: &Metrics,
    ) -> bool {
        let Some(i) = self
            .flights
            .iter()
            .position(|f| f.root == root && f.token == token)
        else {
            return false;
        };
        let flight = self.flights.swap_remove(i);
        if let Some((id, _)) = flight.lease {
            self.lease_answered(&id, status, body, metrics);
            self.pump(root, metrics);
            return true;
        }
        let call = flight.call;
        let outcome = self.service.protocol.wire().read_delivery(status, body);
        if matches!(outcome, Delivery::Retry | Delivery::Refused) {
            log::warn!("usage report failed: status {status:?}");
        }
        self.settle(call, outcome, metrics);
        self.pump(root, metrics);
        true
    }

    fn settle(&mut self, call: u64, outcome: Delivery, metrics: &Metrics) {
        let s: Settled = self.queue.finish_batch(call, outcome, self.host.now_ms());
        if s.rejected > 0 {
            log::warn!(
                "the rate-limit service refused {} usage report(s) as malformed; dropped",
                s.rejected
            );
        }
        metrics.reports_sent.add(s.sent);
        metrics.tokens_reported.add(s.tokens);
        metrics.reports_retried.add(s.retried);
        metrics.reports_failed.add(s.rejected);
        if s.over_limit > 0 {
            metrics.tokens_over_limit.add(s.over_limit);
            log::warn!(
                "the rate-limit service would not record {} token(s) past a limit; what still fitted is sent",
                s.over_limit
            );
        }
    }
}
