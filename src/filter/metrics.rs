//! The plugin's counters, defined once per VM through `define_metric`. Envoy shows them under
//! `wasmcustom.llm_token_ratelimit.*` in `/stats`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::protocol::CheckFailure;

/// A counter id, or nothing when the host refused to define it (counting then silently stops).
#[derive(Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Counter {
        let full = format!("llm_token_ratelimit.{name}");
        match hostcalls::define_metric(MetricType::Counter, &full) {
            Ok(id) => Counter(Some(id)),
            Err(status) => {
                log::warn!("could not define metric {full}: {status:?}");
                Counter(None)
            }
        }
    }

    pub fn inc(self) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, 1);
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
    check_failures: [Counter; 6],
    /// Failed checks that `failure_mode: allow` let through.
    pub failure_mode_allowed: Counter,
    /// Failed checks that `failure_mode: deny` answered with `failure_status`.
    pub failure_mode_denied: Counter,
    /// Request bodies that were too large or not JSON for body-derived attributes.
    pub request_body_unreadable: Counter,
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
        }
    }

    pub fn check_failure(&self, kind: CheckFailure) -> Counter {
        let i = CheckFailure::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.check_failures[i]
    }
}
