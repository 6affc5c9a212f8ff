//! What every HTTP stream of a root context shares with it: the configuration, the VM's metrics
//! and its report queue. Its own module, so the root context (which makes streams) and the
//! streams (which read it) do not import each other.

use std::cell::RefCell;
use std::rc::Rc;

use wire::Amount;

use super::metrics::Metrics;
use super::reporter::Reporter;
use crate::config::Plugin;
use crate::exchange::{Admission, Event};
use crate::lease::{Leases, Local};
use crate::limits::Descriptor;
use crate::report::Spent;

/// What every stream of a root context shares with it.
pub struct Shared {
    pub plugin: Plugin,
    pub metrics: Rc<Metrics>,
    pub reporter: Rc<RefCell<Reporter>>,
    /// The VM's quota leases (the reporter sends their asks).
    pub leases: Rc<RefCell<Leases>>,
    /// The root context's id (its timer is the one a stream arms).
    pub root: u32,
}

/// What a stream's check asks of the VM: ids, and admission under its leases.
pub struct VmAdmission<'s>(pub &'s Shared);

impl Admission for VmAdmission<'_> {
    fn next_id(&mut self) -> Option<String> {
        self.0.next_check_id()
    }

    /// Admits under a lease; when the key's next lease is due, wakes the root context to ask
    /// for it.
    fn lease(&mut self, descriptors: &[Descriptor], reserve: Amount, now_ms: u64) -> Option<Local> {
        // Two configurations of one VM naming other services: only the one reports go to leases.
        let service = self.0.plugin.service()?;
        if !self.0.reporter.try_borrow().ok()?.serves(service) {
            return None;
        }
        let mut leases = self.0.leases.try_borrow_mut().ok()?;
        let local = leases.admit(descriptors, reserve, now_ms);
        let due = leases.woken();
        drop(leases);
        if due {
            if let Ok(mut reporter) = self.0.reporter.try_borrow_mut() {
                reporter.wake(self.0.root);
            }
        }
        local
    }
}

impl Shared {
    /// Hands what a request spent to the VM's report queue.
    pub fn submit(&self, spent: Option<Spent>) {
        // Used beyond its reservation under a lease: that lease admits so much less.
        if let (Some(s), Ok(mut leases)) = (&spent, self.leases.try_borrow_mut()) {
            let excess = s.used.less(s.reserved);
            if let (Some(lease), false) = (&s.lease, excess.is_zero()) {
                leases.exceeded(&s.descriptors, lease, excess);
            }
        }
        if let (Some(spent), Ok(mut reporter)) = (spent, self.reporter.try_borrow_mut()) {
            reporter.submit(spent, self.root, &self.metrics);
        }
    }

    /// An exchange's events, counted.
    pub fn record(&self, events: Vec<Event>) {
        events.into_iter().for_each(|e| self.metrics.record(e));
    }

    /// An id for a check whose reservation a report may have to release.
    pub fn next_check_id(&self) -> Option<String> {
        let mut reporter = self.reporter.try_borrow_mut().ok()?;
        Some(reporter.next_check_id())
    }

    /// The service took a reservation at `at_ms` by its clock, seen at `now_ms` by this VM's.
    pub fn learn_service_clock(&self, at_ms: u64, now_ms: u64) {
        if let Ok(mut reporter) = self.reporter.try_borrow_mut() {
            reporter.service_offset_ms = Some(at_ms as i64 - now_ms as i64);
        }
    }

    /// The clocks' offset (the service's minus this VM's) the last answer showed.
    pub fn service_offset_ms(&self) -> i64 {
        let offset = self
            .reporter
            .try_borrow()
            .ok()
            .and_then(|r| r.service_offset_ms);
        offset.unwrap_or(0)
    }
}
