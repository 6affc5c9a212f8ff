//! Envoy's rate-limit gRPC protocol (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`),
//! spoken to envoyproxy/ratelimit, Limitador or any RLS: the messages the plugin needs, declared
//! with prost's derive (field numbers from `envoy/service/ratelimit/v3/rls.proto`), and the
//! mapping to the plugin's checks and reports.
//!
//! * A check is one `ShouldRateLimit` with one descriptor per applicable limit — the configured
//!   extra entries, then `(limit name, value)` — and `hits_addend` = the reservation. The RLS API
//!   reads `hits_addend: 0` as 1, so at least 1 is always sent (and counted as reserved).
//! * A report is another `ShouldRateLimit` with the same descriptors and `hits_addend` = the
//!   tokens charged minus those reserved (the API cannot refund, so a negative difference sends
//!   nothing). The API has no request ids: a report retried after a lost answer is counted
//!   again (at least once).

pub use prost::Message;

use crate::limits::Descriptor;
use crate::protocol::{CheckFailure, Quota, Verdict};

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    /// `Code`: 0 UNKNOWN, 1 OK, 2 OVER_LIMIT.
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `Unit`: 1 SECOND, 2 MINUTE, 3 HOUR, 4 DAY, 5 MONTH, 6 YEAR.
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

pub const CODE_OK: i32 = 1;
pub const CODE_OVER_LIMIT: i32 = 2;

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

/// The report: `hits_addend` = `tokens - reserved`, or `None` when there is nothing to add.
pub fn report_message(
    domain: &str,
    extra: &[(String, String)],
    ds: &[Descriptor],
    tokens: u64,
    reserved: u64,
) -> Option<Vec<u8>> {
    let add = tokens.saturating_sub(reserved);
    (add > 0).then(|| {
        RateLimitRequest {
            domain: domain.into(),
            descriptors: descriptors(extra, ds),
            hits_addend: hits(add),
        }
        .encode_to_vec()
    })
}

/// For an answer to a report: `None` when it is OK (counted); when it is OVER_LIMIT, the hits
/// that still fit under every limit (the smallest `limit_remaining`).
pub fn over_limit_fits(body: &[u8]) -> Option<u64> {
    let answer = RateLimitResponse::decode(body).ok()?;
    (answer.overall_code == CODE_OVER_LIMIT).then(|| {
        answer
            .statuses
            .iter()
            .filter(|s| s.current_limit.is_some())
            .map(|s| u64::from(s.limit_remaining))
            .min()
            .unwrap_or(0)
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
        .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_ms)));
    let retry_after_ms = answer
        .statuses
        .iter()
        .filter(|s| s.code == CODE_OVER_LIMIT)
        .map(reset_ms)
        .max()
        .unwrap_or(0);
    Ok(Verdict {
        allowed,
        quota,
        spend: None,
        retry_after_ms,
        denied_by: None,
        description: None,
        reserved_at_ms: None,
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

    #[test]
    fn reports_add_what_was_not_reserved() {
        let m = |tokens, reserved| {
            report_message("llm", &[], &alice(), tokens, reserved)
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
