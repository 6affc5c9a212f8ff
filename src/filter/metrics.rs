//! The plugin's counters, defined once per VM through `define_metric`. Envoy shows them under
//! `wasmcustom.llm_token_ratelimit.*` in `/stats`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::protocol::CheckFailure;
use crate::usage::Basis;

fn define(kind: MetricType, name: &str) -> Option<u32> {
    let full = format!("llm_token_ratelimit.{name}");
    hostcalls::define_metric(kind, &full)
        .inspect_err(|status| log::warn!("could not define metric {full}: {status:?}"))
        .ok()
}

/// A counter id, or nothing when the host refused to define it (counting then silently stops).
#[derive(Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Counter {
        Counter(define(MetricType::Counter, name))
    }

    pub fn inc(self) {
        self.add(1);
    }

    pub fn add(self, n: u64) {
        if let (Some(id), Ok(n)) = (self.0, i64::try_from(n)) {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

/// A gauge: a value that goes up and down.
#[derive(Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    fn define(name: &str) -> Gauge {
        Gauge(define(MetricType::Gauge, name))
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

pub struct Metrics {
    /// Requests selected by `matches`.
    pub requests_matched: Counter,
    /// Matched requests to which no limit applied (every key absent or unmatched).
    pub requests_unlimited: Counter,
    pub checks_allowed: Counter,
    pub checks_denied: Counter,
    check_failures: [Counter; CheckFailure::ALL.len()],
    /// Failed checks that `failure_mode: allow` let through.
    pub failure_mode_allowed: Counter,
    /// Failed checks that `failure_mode: deny` answered with `failure_status`.
    pub failure_mode_denied: Counter,
    /// Request bodies that were too large or not JSON for body-derived attributes.
    pub request_body_unreadable: Counter,
    /// Streaming requests rewritten to ask for `stream_options.include_usage`.
    pub stream_usage_injected: Counter,
    /// Responses charged from the provider's usage, from an estimate, or nothing because
    /// usage was missing (`on_missing: zero`) or the upstream failed.
    pub usage_reported: Counter,
    pub usage_estimated: Counter,
    pub usage_missing: Counter,
    pub upstream_errors: Counter,
    /// Tokens the service accepted reports for.
    pub tokens_reported: Counter,
    /// Reports the service accepted, sent again after a failure, given up after
    /// `MAX_ATTEMPTS` or refused, and dropped because the queue was full.
    pub reports_sent: Counter,
    pub reports_retried: Counter,
    pub reports_failed: Counter,
    pub reports_dropped: Counter,
    /// Reports waiting in this VM's queue.
    pub report_queue: Gauge,
    /// This VM's linear memory, in bytes.
    pub vm_memory_bytes: Gauge,
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            requests_matched: Counter::define("requests_matched"),
            requests_unlimited: Counter::define("requests_unlimited"),
            checks_allowed: Counter::define("checks_allowed"),
            checks_denied: Counter::define("checks_denied"),
            check_failures: CheckFailure::ALL
                .map(|k| Counter::define(&format!("check_failures.{}", k.name()))),
            failure_mode_allowed: Counter::define("failure_mode_allowed"),
            failure_mode_denied: Counter::define("failure_mode_denied"),
            request_body_unreadable: Counter::define("request_body_unreadable"),
            stream_usage_injected: Counter::define("stream_usage_injected"),
            usage_reported: Counter::define("usage.reported"),
            usage_estimated: Counter::define("usage.estimated"),
            usage_missing: Counter::define("usage.missing"),
            upstream_errors: Counter::define("usage.upstream_error"),
            tokens_reported: Counter::define("tokens_reported"),
            reports_sent: Counter::define("reports.sent"),
            reports_retried: Counter::define("reports.retried"),
            reports_failed: Counter::define("reports.failed"),
            reports_dropped: Counter::define("reports.dropped"),
            report_queue: Gauge::define("report_queue"),
            vm_memory_bytes: Gauge::define("vm_memory_bytes"),
        }
    }

    pub fn charged(&self, basis: Basis) {
        match basis {
            Basis::Reported => self.usage_reported,
            Basis::Estimated => self.usage_estimated,
            Basis::Missing => self.usage_missing,
            Basis::UpstreamError => self.upstream_errors,
        }
        .inc();
    }

    pub fn check_failure(&self, kind: CheckFailure) -> Counter {
        let i = CheckFailure::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.check_failures[i]
    }
}
