//! The plugin's counters, defined once per VM through the host (`define_metric`). Envoy shows
//! them under `wasmcustom.llm_token_ratelimit.*` in `/stats`.

use std::rc::Rc;

use proxy_wasm::types::MetricType;

use super::host::Host;
use crate::exchange::Event;
use crate::protocol::CheckFailure;
use crate::usage::Basis;

/// A counter, or nothing when the host refused to define it (counting then silently stops).
pub struct Counter {
    id: Option<u32>,
    host: Rc<dyn Host>,
}

impl Counter {
    fn define(host: &Rc<dyn Host>, name: &str) -> Counter {
        Counter {
            id: host.define_metric(MetricType::Counter, &format!("llm_token_ratelimit.{name}")),
            host: Rc::clone(host),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if let (Some(id), Ok(n)) = (self.id, i64::try_from(n)) {
            if n > 0 {
                self.host.add_to_metric(id, n);
            }
        }
    }
}

/// A gauge: a value that goes up and down.
pub struct Gauge {
    id: Option<u32>,
    host: Rc<dyn Host>,
}

impl Gauge {
    fn define(host: &Rc<dyn Host>, name: &str) -> Gauge {
        Gauge {
            id: host.define_metric(MetricType::Gauge, &format!("llm_token_ratelimit.{name}")),
            host: Rc::clone(host),
        }
    }

    pub fn set(&self, value: u64) {
        if let Some(id) = self.id {
            self.host.set_metric(id, value);
        }
    }
}

pub struct Metrics {
    /// Requests selected by `matches`.
    pub requests_matched: Counter,
    /// Matched requests to which no limit applied (every key absent or unmatched).
    pub requests_unlimited: Counter,
    /// Refused because a limit in money applied and the model had no price.
    pub requests_unpriced: Counter,
    pub checks_allowed: Counter,
    pub checks_denied: Counter,
    check_failures: [Counter; CheckFailure::ALL.len()],
    /// Callout answers for a token no call of this plugin is waiting for (ignored).
    pub callouts_unknown: Counter,
    /// Failed checks that `failure_mode: allow` let through.
    pub failure_mode_allowed: Counter,
    /// Failed checks that `failure_mode: deny` answered with `failure_status`.
    pub failure_mode_denied: Counter,
    /// Request bodies that were too large or not JSON for body-derived attributes.
    pub request_body_unreadable: Counter,
    /// Streaming requests rewritten to ask for `stream_options.include_usage`.
    pub stream_usage_injected: Counter,
    /// Requests whose output cap the plugin wrote (`reserve.write_cap`, or a trimmed grant).
    pub request_caps_written: Counter,
    /// Checks the service granted less than the request's cap (`reserve.trim`).
    pub checks_trimmed: Counter,
    /// Streams ended in their provider's shape because their budget was spent, and of those,
    /// reset when their upstream went on past the drain.
    pub streams_cut: Counter,
    /// Requests admitted that a shadow limit (`"mode": "shadow"`) would have denied.
    pub shadow_denied: Counter,
    pub streams_reset: Counter,
    /// Responses charged from the provider's usage, from an estimate, or nothing because
    /// usage was missing (`on_missing: zero`) or the upstream failed.
    pub usage_reported: Counter,
    pub usage_estimated: Counter,
    pub usage_missing: Counter,
    pub upstream_errors: Counter,
    /// Requests whose client left before the response began (charged their reservation).
    pub usage_abandoned: Counter,
    /// Tokens the service accepted reports for.
    pub tokens_reported: Counter,
    /// Tokens an engine would not record past a limit (`envoy-rls` with Limitador).
    pub tokens_over_limit: Counter,
    /// Reports the service accepted, sent again after a failure, given up after
    /// `MAX_ATTEMPTS` or refused, and dropped because the queue was full.
    pub reports_sent: Counter,
    pub reports_retried: Counter,
    pub reports_failed: Counter,
    pub reports_dropped: Counter,
    /// Requests admitted under a quota lease (no check); lease asks granted, declined by the
    /// service, and failed (no answer: the ask is released); leases held now.
    pub leases_admitted: Counter,
    pub leases_granted: Counter,
    pub leases_declined: Counter,
    pub leases_failed: Counter,
    pub leases_held: Gauge,
    /// Reports waiting in this VM's queue.
    pub report_queue: Gauge,
    /// This VM's linear memory, in bytes.
    pub vm_memory_bytes: Gauge,
}

impl Metrics {
    pub fn define(host: &Rc<dyn Host>) -> Metrics {
        let counter = |name: &str| Counter::define(host, name);
        let gauge = |name: &str| Gauge::define(host, name);
        Metrics {
            requests_matched: counter("requests_matched"),
            requests_unlimited: counter("requests_unlimited"),
            requests_unpriced: counter("requests_unpriced"),
            checks_allowed: counter("checks_allowed"),
            checks_denied: counter("checks_denied"),
            check_failures: CheckFailure::ALL
                .map(|k| counter(&format!("check_failures.{}", k.name()))),
            callouts_unknown: counter("callouts_unknown"),
            failure_mode_allowed: counter("failure_mode_allowed"),
            failure_mode_denied: counter("failure_mode_denied"),
            request_body_unreadable: counter("request_body_unreadable"),
            stream_usage_injected: counter("stream_usage_injected"),
            request_caps_written: counter("request_caps_written"),
            checks_trimmed: counter("checks_trimmed"),
            streams_cut: counter("streams_cut"),
            shadow_denied: counter("shadow_denied"),
            streams_reset: counter("streams_reset"),
            usage_reported: counter("usage.reported"),
            usage_estimated: counter("usage.estimated"),
            usage_missing: counter("usage.missing"),
            upstream_errors: counter("usage.upstream_error"),
            usage_abandoned: counter("usage.abandoned"),
            tokens_reported: counter("tokens_reported"),
            tokens_over_limit: counter("tokens_over_limit"),
            reports_sent: counter("reports.sent"),
            reports_retried: counter("reports.retried"),
            reports_failed: counter("reports.failed"),
            reports_dropped: counter("reports.dropped"),
            leases_admitted: counter("leases.admitted"),
            leases_granted: counter("leases.granted"),
            leases_declined: counter("leases.declined"),
            leases_failed: counter("leases.failed"),
            leases_held: gauge("leases.held"),
            report_queue: gauge("report_queue"),
            vm_memory_bytes: gauge("vm_memory_bytes"),
        }
    }

    /// Counts what an exchange reports.
    pub fn record(&self, event: Event) {
        let m = self;
        match event {
            Event::Matched => m.requests_matched.inc(),
            Event::Unlimited => m.requests_unlimited.inc(),
            Event::Unpriced => m.requests_unpriced.inc(),
            Event::BodyUnreadable => m.request_body_unreadable.inc(),
            Event::StreamUsageInjected => m.stream_usage_injected.inc(),
            Event::CapWritten => m.request_caps_written.inc(),
            Event::Trimmed => m.checks_trimmed.inc(),
            Event::Allowed => m.checks_allowed.inc(),
            Event::Denied => m.checks_denied.inc(),
            Event::CheckFailed(kind) => m.check_failure(kind).inc(),
            Event::FailureAllowed => m.failure_mode_allowed.inc(),
            Event::FailureDenied => m.failure_mode_denied.inc(),
            Event::CalloutUnknown => m.callouts_unknown.inc(),
            Event::Charged(basis) => m.charged(basis),
            Event::Leased => m.leases_admitted.inc(),
            Event::StreamCut => m.streams_cut.inc(),
            Event::ShadowDenied => m.shadow_denied.inc(),
            Event::StreamReset => m.streams_reset.inc(),
        }
    }

    pub fn charged(&self, basis: Basis) {
        match basis {
            Basis::Reported => &self.usage_reported,
            Basis::Estimated => &self.usage_estimated,
            Basis::Missing => &self.usage_missing,
            Basis::UpstreamError => &self.upstream_errors,
            Basis::Abandoned => &self.usage_abandoned,
        }
        .inc();
    }

    pub fn check_failure(&self, kind: CheckFailure) -> &Counter {
        let i = CheckFailure::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        &self.check_failures[i]
    }
}
