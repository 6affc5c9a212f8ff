//! Envoy's rate-limit gRPC protocol (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`),
//! spoken to envoyproxy/ratelimit, Limitador or any RLS: the mapping of the plugin's checks and
//! reports to its messages (declared in the wire crate, `wire::rls`).
//!
//! * A check is one `ShouldRateLimit` with one descriptor per applicable limit — the configured
//!   extra entries, then `(limit name, value)` — and `hits_addend` = the reservation. The RLS API
//!   reads `hits_addend: 0` as 1, so at least 1 is always sent (and counted as reserved).
//! * A report is another `ShouldRateLimit` with the same descriptors and `hits_addend` = the
//!   tokens charged minus those reserved (the API cannot refund, so a negative difference sends
//!   nothing). The API has no request ids: a report retried after a lost answer is counted
//!   again (at least once).

pub use wire::rls::*;

use crate::limits::Descriptor;
use crate::verdict::{CheckFailure, Quota, Verdict};

/// The descriptors of one request in RLS form.
fn descriptors(extra: &[(String, String)], descriptors: &[Descriptor]) -> Vec<RateLimitDescriptor> {
    descriptors
        .iter()
        .map(|d| RateLimitDescriptor {
            entries: extra
                .iter()
                .map(|(key, value)| Entry {
                    key: key.clone(),
                    value: value.clone(),
                })
                .chain(std::iter::once(Entry {
                    key: d.limit.clone(),
                    value: d.value.clone(),
                }))
                .collect(),
        })
        .collect()
}

/// `hits` as the API's `uint32` (the API reads 0 as 1).
fn hits(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// The check: `hits_addend` = `reserve`, at least 1.
pub fn check_message(
    domain: &str,
    extra: &[(String, String)],
    ds: &[Descriptor],
    reserve: u64,
) -> Vec<u8> {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors(extra, ds),
        hits_addend: hits(reserve),
    }
    .encode_to_vec()
}

/// The report: `hits_addend` = `add` (the tokens used beyond the reservation), or `None` when
/// there is nothing to add.
pub fn report_message(
    domain: &str,
    extra: &[(String, String)],
    ds: &[Descriptor],
    add: u64,
) -> Option<Vec<u8>> {
    (add > 0).then(|| {
        RateLimitRequest {
            domain: domain.into(),
            descriptors: descriptors(extra, ds),
            hits_addend: hits(add),
        }
        .encode_to_vec()
    })
}

/// An answer to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportAnswer {
    /// Counted (or an answer the plugin cannot read, taken as counted).
    Counted,
    /// OVER_LIMIT: not counted. What still fits under every limit when the engine says
    /// (the smallest `limit_remaining`, or Limitador's `X-RateLimit-Remaining`); Limitador
    /// without its headers says nothing.
    OverLimit(Option<u64>),
}

pub fn report_answer(body: &[u8]) -> ReportAnswer {
    let Ok(answer) = RateLimitResponse::decode(body) else {
        return ReportAnswer::Counted;
    };
    if answer.overall_code != CODE_OVER_LIMIT {
        return ReportAnswer::Counted;
    }
    let from_statuses = answer
        .statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .map(|s| u64::from(s.limit_remaining))
        .min();
    ReportAnswer::OverLimit(from_statuses.or_else(|| header_quota(&answer).map(|q| q.remaining)))
}

/// The figures Limitador puts in `response_headers_to_add` (`X-RateLimit-Limit: 100, 100;w=3600`,
/// `-Remaining`, `-Reset` in seconds): the most constrained of its counters. Both limit and
/// remaining must be there.
fn header_quota(answer: &RateLimitResponse) -> Option<Quota> {
    let number = |name: &str| {
        let value = answer
            .response_headers_to_add
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name))?
            .value
            .trim_start();
        let digits = value.bytes().take_while(u8::is_ascii_digit).count();
        value.get(..digits)?.parse::<u64>().ok()
    };
    let limit = number("x-ratelimit-limit")?;
    Some(Quota {
        limit,
        remaining: number("x-ratelimit-remaining")?.min(limit),
        reset_ms: number("x-ratelimit-reset").map_or(0, |s| s.saturating_mul(1000)),
    })
}

/// Reads a `ShouldRateLimit` answer: `grpc_status` 0 with a decodable OK or OVER_LIMIT is a
/// decision; anything else is a service failure (`failure_mode` applies).
pub fn read_check(grpc_status: u32, body: &[u8]) -> Result<Verdict, CheckFailure> {
    match grpc_status {
        0 => {}
        4 => return Err(CheckFailure::Timeout),
        14 => return Err(CheckFailure::Unavailable),
        // INVALID_ARGUMENT: the service refused the request itself.
        3 => return Err(CheckFailure::Rejected),
        _ => return Err(CheckFailure::Status),
    }
    let answer = RateLimitResponse::decode(body).map_err(|_| CheckFailure::Body)?;
    let allowed = match answer.overall_code {
        CODE_OK => true,
        CODE_OVER_LIMIT => false,
        _ => return Err(CheckFailure::Body),
    };
    let reset_ms = |s: &DescriptorStatus| {
        s.duration_until_reset.as_ref().map_or(0, |d| {
            (d.seconds.max(0) as u64).saturating_mul(1000) + (d.nanos.max(0) as u64) / 1_000_000
        })
    };
    let quota = answer
        .statuses
        .iter()
        .filter_map(|s| {
            let limit = s.current_limit.as_ref()?;
            Some(Quota {
                limit: u64::from(limit.requests_per_unit),
                remaining: u64::from(s.limit_remaining.min(limit.requests_per_unit)),
                reset_ms: reset_ms(s),
            })
        })
        .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_ms)))
        .or_else(|| header_quota(&answer));
    let retry_after_ms = answer
        .statuses
        .iter()
        .filter(|s| s.code == CODE_OVER_LIMIT)
        .map(reset_ms)
        .max()
        // Limitador names no status; its headers give the most constrained counter's reset.
        .or_else(|| quota.filter(|_| !allowed).map(|q| q.reset_ms))
        .unwrap_or(0);
    Ok(Verdict {
        allowed,
        quota,
        spend: None,
        retry_after_ms,
        denied_by: None,
        description: None,
        reserved_at_ms: None,
        granted: None,
        shadow_denied: Vec::new(),
        lease: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Vec<Descriptor> {
        vec![Descriptor {
            limit: "per-user".into(),
            value: "alice".into(),
            rates: vec![],
            shared: false,
            ..Default::default()
        }]
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn check_bytes_match_the_proto() {
        // domain "llm" (field 1), one descriptor (field 2) holding one entry
        // {key "per-user", value "alice"}, hits_addend 3 (field 3).
        assert_eq!(
            hex(&check_message("llm", &[], &alice(), 3)),
            "0a036c6c6d\
             1213\
             0a11\
             0a087065722d75736572\
             1205616c696365\
             1803"
        );
        // Extra entries come first; a reservation of 0 is sent as 1.
        let m = RateLimitRequest::decode(
            check_message("llm", &[("generic_key".into(), "gw".into())], &alice(), 0).as_slice(),
        )
        .unwrap();
        assert_eq!(m.hits_addend, 1);
        assert_eq!(m.descriptors[0].entries[0].key, "generic_key");
        assert_eq!(m.descriptors[0].entries[1].value, "alice");
    }

    fn answer(code: i32, statuses: Vec<DescriptorStatus>, headers: &[(&str, &str)]) -> Vec<u8> {
        RateLimitResponse {
            overall_code: code,
            statuses,
            response_headers_to_add: headers
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// What each engine says when it refuses: envoyproxy/ratelimit fills `statuses`, Limitador
    /// fills nothing, or only its `X-RateLimit-*` headers when run with them.
    #[test]
    fn what_still_fits_is_read_from_whatever_the_engine_says() {
        let status = DescriptorStatus {
            code: CODE_OVER_LIMIT,
            current_limit: Some(RateLimit {
                requests_per_unit: 100,
                unit: 3,
                name: String::new(),
            }),
            limit_remaining: 9,
            duration_until_reset: None,
        };
        assert_eq!(
            report_answer(&answer(CODE_OVER_LIMIT, vec![status], &[])),
            ReportAnswer::OverLimit(Some(9))
        );
        assert_eq!(
            report_answer(&answer(CODE_OVER_LIMIT, vec![], &[])),
            ReportAnswer::OverLimit(None)
        );
        let limitador = [
            ("X-RateLimit-Limit", "100, 100;w=3600"),
            ("X-RateLimit-Remaining", "7"),
            ("X-RateLimit-Reset", "3595"),
        ];
        assert_eq!(
            report_answer(&answer(CODE_OVER_LIMIT, vec![], &limitador)),
            ReportAnswer::OverLimit(Some(7))
        );
        assert_eq!(
            report_answer(&answer(CODE_OK, vec![], &[])),
            ReportAnswer::Counted
        );
        // A check: the headers are the quota, their reset the retry.
        let v = read_check(0, &answer(CODE_OVER_LIMIT, vec![], &limitador)).unwrap();
        assert!(!v.allowed);
        assert_eq!(
            v.quota,
            Some(Quota {
                limit: 100,
                remaining: 7,
                reset_ms: 3_595_000
            })
        );
        assert_eq!(v.retry_after_ms, 3_595_000);
        let v = read_check(0, &answer(CODE_OVER_LIMIT, vec![], &[])).unwrap();
        assert_eq!((v.quota, v.retry_after_ms), (None, 0));
    }

    #[test]
    fn reports_add_what_was_not_reserved() {
        let m = |tokens, reserved| {
            report_message("llm", &[], &alice(), u64::saturating_sub(tokens, reserved))
                .map(|b| RateLimitRequest::decode(b.as_slice()).unwrap().hits_addend)
        };
        assert_eq!(m(105, 1), Some(104));
        assert_eq!(m(10, 10), None);
        assert_eq!(m(5, 100), None, "the API cannot refund");
        assert_eq!(m(u64::MAX, 0), Some(u32::MAX));
    }

    #[test]
    fn answers_from_known_bytes() {
        // OVER_LIMIT; one status: OVER_LIMIT, current_limit {100 per MINUTE}, remaining 0,
        // duration_until_reset 42 s.
        let over = [
            0x08, 0x02, 0x12, 0x0c, 0x08, 0x02, 0x12, 0x04, 0x08, 0x64, 0x10, 0x02, 0x22, 0x02,
            0x08, 0x2a,
        ];
        let v = read_check(0, &over).unwrap();
        assert!(!v.allowed);
        assert_eq!(
            v.quota,
            Some(Quota {
                limit: 100,
                remaining: 0,
                reset_ms: 42_000
            })
        );
        assert_eq!(v.retry_after_ms, 42_000);
        let ok = read_check(0, &[0x08, 0x01]).unwrap();
        assert!(ok.allowed && ok.quota.is_none());
        assert_eq!(read_check(0, &[]), Err(CheckFailure::Body), "UNKNOWN");
        assert_eq!(read_check(0, &[0xff, 0xff]), Err(CheckFailure::Body));
        assert_eq!(read_check(14, &[]), Err(CheckFailure::Unavailable));
        assert_eq!(read_check(4, &[]), Err(CheckFailure::Timeout));
        assert_eq!(read_check(13, &[]), Err(CheckFailure::Status));
    }
}
