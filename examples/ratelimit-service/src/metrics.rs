//! Prometheus counters for `/metrics`: plain atomics, rendered as text on demand, so the hot
//! path pays one relaxed increment per figure.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the check latency histogram, in seconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

#[derive(Default)]
pub struct Metrics {
    pub checks_allowed: AtomicU64,
    pub checks_denied: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Allowed checks that took less than their reserve (`trim`).
    pub checks_trimmed: AtomicU64,
    /// Lease asks granted, and those declined (too near a limit, leasing off, a bucket, too
    /// little of the window left, or a release that came first).
    pub leases_granted: AtomicU64,
    pub leases_declined: AtomicU64,
    pub reports_accepted: AtomicU64,
    pub reports_duplicate: AtomicU64,
    pub reports_failed: AtomicU64,
    /// Reports refused on their own (malformed, or an id older than its source's window).
    pub reports_rejected: AtomicU64,
    pub tokens_charged: AtomicU64,
    pub tokens_refunded: AtomicU64,
    pub store_errors: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Releases that gave a recorded reservation back, and those that found none (never
    /// taken, already released, or too old to know).
    pub reservations_released: AtomicU64,
    pub releases_without_reservation: AtomicU64,
    /// Reservations taken without being recorded for a release (store error, or a sequence
    /// older than the source's ring).
    pub reservations_unrecorded: AtomicU64,
    /// Admin API actions, and requests refused for a missing or wrong token.
    pub admin_grants: AtomicU64,
    pub admin_resets: AtomicU64,
    pub admin_unauthorized: AtomicU64,
    /// Requests refused for a missing or wrong API key (`--api-key`).
    pub unauthorized: AtomicU64,
    /// Connections accepted and closed, those closed for stalling (no request head in time,
    /// idle too long), and request bodies not sent in time (408).
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_timed_out: AtomicU64,
    pub bodies_timed_out: AtomicU64,
    /// Money charged and refunded per limit that counts it, in micro units, by (limit,
    /// currency); at most [`MAX_SPEND_SERIES`] series (limit names come from plugin configs).
    spend: Mutex<BTreeMap<(String, String), (u64, u64)>>,
    /// Checks a shadow limit would have denied, per limit; at most [`MAX_SPEND_SERIES`]
    /// series, more summed under `limit=""`.
    shadow_denied: Mutex<BTreeMap<String, u64>>,
    /// Alerts not raised: past the most one report batch may raise.
    pub alerts_suppressed: AtomicU64,
    /// Calendar counters restored from the spend ledger after their store lost them.
    pub ledger_restored: AtomicU64,
    /// Alerts raised, per (limit, threshold); at most [`MAX_SPEND_SERIES`] series.
    alerts: Mutex<BTreeMap<(String, String), u64>>,
    /// What the webhook sender did with them (shared with it).
    pub alert_deliveries: std::sync::Arc<crate::alerts::Deliveries>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

/// The most (limit, currency) series of the spend counters; more are summed under `limit=""`.
pub const MAX_SPEND_SERIES: usize = 1000;

/// A label value as the Prometheus text format writes it: a backslash, a quote or a line feed
/// in a limit name sent by any caller cannot end the label or the line.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Metrics {
    pub fn observe_check(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn charged(&self, delta: i64) {
        if delta >= 0 {
            self.tokens_charged.fetch_add(delta as u64, Relaxed);
        } else {
            self.tokens_refunded
                .fetch_add(delta.unsigned_abs(), Relaxed);
        }
    }

    /// Money spent under a limit (negative: given back), in micro units of `currency`.
    pub fn spent(&self, limit: &str, currency: &str, micros: i64) {
        let mut spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (limit.to_string(), currency.to_string());
        if !spend.contains_key(&key) && spend.len() >= MAX_SPEND_SERIES {
            key.0 = String::new();
        }
        let (charged, refunded) = spend.entry(key).or_default();
        if micros >= 0 {
            *charged += micros as u64;
        } else {
            *refunded += micros.unsigned_abs();
        }
    }

    /// A shadow limit would have denied a check.
    pub fn shadow_denied(&self, limit: &str) {
        let mut denied = self.shadow_denied.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = limit.to_string();
        if !denied.contains_key(&key) && denied.len() >= MAX_SPEND_SERIES {
            key = String::new();
        }
        *denied.entry(key).or_default() += 1;
    }

    /// A report brought a limit to an alert threshold (`threshold`: the fraction, e.g. `0.8`).
    pub fn alerted(&self, limit: &str, threshold: &str) {
        let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (limit.to_string(), threshold.to_string());
        if !alerts.contains_key(&key) && alerts.len() >= MAX_SPEND_SERIES {
            key.0 = String::new();
        }
        *alerts.entry(key).or_default() += 1;
    }

    /// The Prometheus text; `memory`: the memory store's (counters, evictions, sources).
    pub fn render(&self, store: &str, memory: Option<(usize, u64, usize)>) -> String {
        let mut out = String::new();
        let mut family = |name: &str, help: &str, kind: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let g = |c: &AtomicU64| c.load(Relaxed);
        family(
            "ratelimit_checks_total",
            "Checks answered, by outcome.",
            "counter",
            &[
                ("{outcome=\"allowed\"}", g(&self.checks_allowed)),
                ("{outcome=\"denied\"}", g(&self.checks_denied)),
                ("{outcome=\"error\"}", g(&self.checks_failed)),
            ],
        );
        family(
            "ratelimit_checks_trimmed_total",
            "Allowed checks that took less than their reserve, to serve within the budget.",
            "counter",
            &[("", g(&self.checks_trimmed))],
        );
        family(
            "ratelimit_leases_total",
            "Quota lease asks, by outcome (a lease lets a plugin VM admit by itself).",
            "counter",
            &[
                ("{outcome=\"granted\"}", g(&self.leases_granted)),
                ("{outcome=\"declined\"}", g(&self.leases_declined)),
            ],
        );
        family(
            "ratelimit_reports_total",
            "Usage reports, by outcome (duplicates are retries already applied).",
            "counter",
            &[
                ("{outcome=\"accepted\"}", g(&self.reports_accepted)),
                ("{outcome=\"duplicate\"}", g(&self.reports_duplicate)),
                ("{outcome=\"error\"}", g(&self.reports_failed)),
                ("{outcome=\"rejected\"}", g(&self.reports_rejected)),
            ],
        );
        family(
            "ratelimit_tokens_charged_total",
            "Tokens charged by reports and reservations.",
            "counter",
            &[("", g(&self.tokens_charged))],
        );
        family(
            "ratelimit_tokens_refunded_total",
            "Tokens given back (unused reservations).",
            "counter",
            &[("", g(&self.tokens_refunded))],
        );
        family(
            "ratelimit_releases_total",
            "Releases of reservations whose check the plugin never saw answered, by outcome.",
            "counter",
            &[
                ("{outcome=\"released\"}", g(&self.reservations_released)),
                ("{outcome=\"none\"}", g(&self.releases_without_reservation)),
            ],
        );
        family(
            "ratelimit_reservations_unrecorded_total",
            "Reservations a release could not give back (not recorded).",
            "counter",
            &[("", g(&self.reservations_unrecorded))],
        );
        family(
            "ratelimit_admin_actions_total",
            "Admin API actions (--admin-token), and requests refused without a valid token.",
            "counter",
            &[
                ("{action=\"grant\"}", g(&self.admin_grants)),
                ("{action=\"reset\"}", g(&self.admin_resets)),
                ("{action=\"unauthorized\"}", g(&self.admin_unauthorized)),
            ],
        );
        family(
            "ratelimit_unauthorized_total",
            "Requests refused with 401 for a missing or wrong API key (--api-key).",
            "counter",
            &[("", g(&self.unauthorized))],
        );
        family(
            "ratelimit_connections_total",
            "Connections opened, closed, and closed for stalling (no request head in time, idle too long); request bodies not sent in time (408).",
            "counter",
            &[
                ("{event=\"opened\"}", g(&self.connections_opened)),
                ("{event=\"closed\"}", g(&self.connections_closed)),
                ("{event=\"timed_out\"}", g(&self.connections_timed_out)),
                ("{event=\"body_timed_out\"}", g(&self.bodies_timed_out)),
            ],
        );
        family(
            "ratelimit_ledger_restored_total",
            "Calendar counters given their period's spend from the ledger after their store lost it.",
            "counter",
            &[("", g(&self.ledger_restored))],
        );
        family(
            "ratelimit_store_errors_total",
            "Store calls that failed.",
            "counter",
            &[("", g(&self.store_errors))],
        );
        family(
            "ratelimit_bad_requests_total",
            "Requests refused with 400.",
            "counter",
            &[("", g(&self.bad_requests))],
        );
        {
            let spend = self.spend.lock().unwrap_or_else(|p| p.into_inner());
            let series = |pick: fn(&(u64, u64)) -> u64| -> Vec<(String, u64)> {
                spend
                    .iter()
                    .map(|((limit, currency), v)| {
                        let (limit, currency) = (label(limit), label(currency));
                        (
                            format!("{{limit=\"{limit}\",currency=\"{currency}\"}}"),
                            pick(v),
                        )
                    })
                    .collect()
            };
            let charged = series(|v| v.0);
            let refunded = series(|v| v.1);
            let lines: Vec<(&str, u64)> = charged.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(
                "ratelimit_spend_micros_total",
                "Money charged to limits that count it, in millionths of the currency (reservations and reports).",
                "counter",
                &lines,
            );
            let lines: Vec<(&str, u64)> = refunded.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(
                "ratelimit_spend_refunded_micros_total",
                "Money given back to limits that count it (unused reservations), in millionths.",
                "counter",
                &lines,
            );
        }
        {
            let denied = self.shadow_denied.lock().unwrap_or_else(|p| p.into_inner());
            let labels: Vec<(String, u64)> = denied
                .iter()
                .map(|(limit, n)| (format!("{{limit=\"{}\"}}", label(limit)), *n))
                .collect();
            let lines: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(
                "ratelimit_shadow_denied_total",
                "Checks a shadow limit (\"mode\": \"shadow\") would have denied, per limit; they were not denied.",
                "counter",
                &lines,
            );
        }
        {
            let alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
            let labels: Vec<(String, u64)> = alerts
                .iter()
                .map(|((limit, threshold), n)| {
                    let labels = format!(
                        "{{limit=\"{}\",threshold=\"{}\"}}",
                        label(limit),
                        label(threshold)
                    );
                    (labels, *n)
                })
                .collect();
            let lines: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(
                "ratelimit_alerts_total",
                "Alert thresholds reached, per limit and threshold: each once per key and window, on the replica whose report reached it.",
                "counter",
                &lines,
            );
            let d = &self.alert_deliveries;
            family(
                "ratelimit_alert_deliveries_total",
                "Alerts posted to --alert-webhook: sent (2xx), failed (every attempt failed, or refused with a 4xx), dropped (the sender's queue was full).",
                "counter",
                &[
                    ("{outcome=\"sent\"}", d.sent.load(Relaxed)),
                    ("{outcome=\"failed\"}", d.failed.load(Relaxed)),
                    ("{outcome=\"dropped\"}", d.dropped.load(Relaxed)),
                ],
            );
            family(
                "ratelimit_alerts_suppressed_total",
                "Alert thresholds reached but not raised: past the 256 one report batch may raise.",
                "counter",
                &[("", self.alerts_suppressed.load(Relaxed))],
            );
            family(
                "ratelimit_alert_retries_total",
                "Posts of an alert retried after a failure (no answer, a timeout, 5xx, 408 or 429).",
                "counter",
                &[("", d.retries.load(Relaxed))],
            );
        }
        if let Some((counters, evicted, sources)) = memory {
            family(
                "ratelimit_memory_counters",
                "Live counters in the memory store.",
                "gauge",
                &[("", counters as u64)],
            );
            family(
                "ratelimit_memory_evictions_total",
                "Counters the memory store evicted (least recently used) to make room.",
                "counter",
                &[("", evicted)],
            );
            family(
                "ratelimit_memory_sources",
                "Plugin VMs whose report and reservation ids the memory store remembers.",
                "gauge",
                &[("", sources as u64)],
            );
        }
        let _ = writeln!(out, "# HELP ratelimit_store_info The store in use.\n# TYPE ratelimit_store_info gauge\nratelimit_store_info{{store=\"{store}\"}} 1");
        let _ = writeln!(out, "# HELP ratelimit_check_duration_seconds Check latency inside the service.\n# TYPE ratelimit_check_duration_seconds histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "ratelimit_check_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                g(bucket)
            );
        }
        let count = g(&self.latency_count);
        let _ = writeln!(
            out,
            "ratelimit_check_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "ratelimit_check_duration_seconds_sum {}",
            g(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "ratelimit_check_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limit name is any caller's: it cannot end a label or a line of the exposition.
    #[test]
    fn label_values_cannot_break_the_text_format() {
        let m = Metrics::default();
        m.shadow_denied("a\"}\nratelimit_fake 1\\");
        m.spent("b\nc", "USD", 5);
        let text = m.render("memory", None);
        assert!(
            !text.lines().any(|l| l.starts_with("ratelimit_fake")),
            "{text}"
        );
        assert!(
            text.contains(r#"ratelimit_shadow_denied_total{limit="a\"}\nratelimit_fake 1\\"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{limit="b\nc",currency="USD"} 5"#),
            "{text}"
        );
    }
}
