//! The wire protocols between the plugin and the rate-limit service, each behind one trait
//! ([`Wire`]): what a check sends and how its answer is read, what a report sends and how its
//! delivery is read, what a reservation means, how reports are batched.

use wire::Outcome;

use crate::config::{Protocol, ServiceConfig};
use crate::limits::Descriptor;
use crate::report::{Delivery, Report, BATCH};
use crate::rls;
pub use crate::verdict::{CheckFailure, MoneyQuota, Quota, Verdict};

/// A call for the adapter to dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Http(Call),
    /// A `ShouldRateLimit` message for Envoy's rate-limit gRPC service.
    Grpc(Vec<u8>),
}

/// An HTTP call for the adapter to dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Vec<u8>>,
}

/// One wire protocol between the plugin and a rate-limit service: everything that differs
/// between v1, `asm` and `envoy-rls` is answered here, so the rest of the plugin never asks
/// which one it speaks ([`Protocol::wire`]).
pub trait Wire {
    /// The check for `descriptors`, reserving `reserve` tokens from each on admission; `id`
    /// names it for a later release (protocols with [`Wire::releases`]).
    fn check_call(
        &self,
        service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: u64,
        reserve_cost: u64,
        id: Option<&str>,
    ) -> Outbound;

    /// Reads the answer to a check: `status` is the HTTP status (`None` when the call ended
    /// without headers), or the gRPC status.
    fn read_check(&self, status: Option<u32>, body: &[u8]) -> Result<Verdict, CheckFailure>;

    /// The call that delivers `reports`, or `None` when there is nothing to send.
    fn report_call(&self, service: &ServiceConfig, reports: &[&Report]) -> Option<Outbound>;

    /// Reads the answer to a report call.
    fn read_delivery(&self, status: Option<u32>, body: &[u8]) -> Delivery;

    /// What a check actually reserves when the configuration wants `wanted` tokens.
    fn reservation(&self, wanted: u64) -> u64;

    /// Whether the service can tell, by a check's id, if it took the check's reservation, so
    /// that a reservation nobody will settle can be released.
    fn releases(&self) -> bool;

    /// Reports per call, and calls in flight at once.
    fn batching(&self) -> (usize, usize);
}

impl Protocol {
    pub fn wire(self) -> &'static dyn Wire {
        match self {
            Protocol::V1 => &V1,
            Protocol::Asm => &Asm,
            Protocol::EnvoyRls => &EnvoyRls,
        }
    }
}

/// JSON `/v1/check` and `/v1/report`: reservations given back, reports batched, per-report
/// answers, ids for releases and retries.
pub struct V1;

/// The ASM example service's `GET /ratelimit` and `POST /update_ratelimit_record`: no
/// reservations, no figures, no ids; one request's usage per report call.
pub struct Asm;

/// Envoy's rate-limit gRPC service (`ShouldRateLimit`): every check counts at least one hit,
/// a report adds what the request used beyond its reservation, nothing is given back.
pub struct EnvoyRls;

impl Wire for V1 {
    fn check_call(
        &self,
        _service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: u64,
        reserve_cost: u64,
        id: Option<&str>,
    ) -> Outbound {
        Outbound::Http(Call {
            method: "POST",
            path: "/v1/check".into(),
            // Serialising plain structs of strings and integers cannot fail.
            body: serde_json::to_vec(&wire::CheckRequest {
                descriptors,
                reserve,
                reserve_cost,
                id: id.map(str::to_owned),
            })
            .ok(),
        })
    }

    fn read_check(&self, status: Option<u32>, body: &[u8]) -> Result<Verdict, CheckFailure> {
        http_decision(status).and_then(|()| read_v1(body))
    }

    fn report_call(&self, _service: &ServiceConfig, reports: &[&Report]) -> Option<Outbound> {
        Some(Outbound::Http(Call {
            method: "POST",
            path: "/v1/report".into(),
            body: serde_json::to_vec(&wire::ReportRequest {
                reports: reports.to_vec(),
            })
            .ok(),
        }))
    }

    fn read_delivery(&self, status: Option<u32>, body: &[u8]) -> Delivery {
        http_delivery(status, || outcomes(body))
    }

    fn reservation(&self, wanted: u64) -> u64 {
        wanted
    }

    fn releases(&self) -> bool {
        true
    }

    fn batching(&self) -> (usize, usize) {
        (BATCH, 2)
    }
}

impl Wire for Asm {
    fn check_call(
        &self,
        _service: &ServiceConfig,
        descriptors: &[Descriptor],
        _reserve: u64,
        _reserve_cost: u64,
        _id: Option<&str>,
    ) -> Outbound {
        let keys: Vec<&str> = descriptors.iter().map(|d| d.value.as_str()).collect();
        let json = serde_json::to_string(&keys).unwrap_or_default();
        Outbound::Http(Call {
            method: "GET",
            path: format!("/ratelimit?ratelimit_keys={}", url_encode(&json)),
            body: None,
        })
    }

    fn read_check(&self, status: Option<u32>, body: &[u8]) -> Result<Verdict, CheckFailure> {
        http_decision(status).and_then(|()| read_asm(body))
    }

    fn report_call(&self, _service: &ServiceConfig, reports: &[&Report]) -> Option<Outbound> {
        let r = reports.first()?;
        let usage = r.usage.unwrap_or_default();
        Some(Outbound::Http(Call {
            method: "POST",
            path: "/update_ratelimit_record".into(),
            body: serde_json::to_vec(&wire::AsmUpdate {
                ratelimit_keys: r
                    .descriptors
                    .iter()
                    .map(|d| d.value.as_str())
                    .collect::<Vec<_>>(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                // What the plugin charges (per `usage.count`): the ASM service charges it.
                total_tokens: r.tokens,
            })
            .ok(),
        }))
    }

    fn read_delivery(&self, status: Option<u32>, _body: &[u8]) -> Delivery {
        http_delivery(status, Vec::new)
    }

    fn reservation(&self, _wanted: u64) -> u64 {
        0
    }

    fn releases(&self) -> bool {
        false
    }

    fn batching(&self) -> (usize, usize) {
        (1, 8)
    }
}

impl Wire for EnvoyRls {
    fn check_call(
        &self,
        service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: u64,
        _reserve_cost: u64,
        _id: Option<&str>,
    ) -> Outbound {
        Outbound::Grpc(rls::check_message(
            &service.domain,
            &service.descriptor_entries,
            descriptors,
            reserve,
        ))
    }

    fn read_check(&self, status: Option<u32>, body: &[u8]) -> Result<Verdict, CheckFailure> {
        rls::read_check(status.unwrap_or(GRPC_UNAVAILABLE), body)
    }

    fn report_call(&self, service: &ServiceConfig, reports: &[&Report]) -> Option<Outbound> {
        let r = reports.first()?;
        rls::report_message(
            &service.domain,
            &service.descriptor_entries,
            &r.descriptors,
            r.tokens,
            r.reserved,
        )
        .map(Outbound::Grpc)
    }

    /// INVALID_ARGUMENT and UNIMPLEMENTED cannot get better. An OVER_LIMIT answer to a report
    /// may mean it was not counted (Limitador refuses hits past a limit; envoyproxy/ratelimit
    /// counts them and answers 0 remaining): what still fits is sent again (see
    /// [`Delivery::OverLimit`]).
    fn read_delivery(&self, status: Option<u32>, body: &[u8]) -> Delivery {
        match status.unwrap_or(GRPC_UNAVAILABLE) {
            0 => match rls::report_answer(body) {
                rls::ReportAnswer::OverLimit(fits) => Delivery::OverLimit { fits },
                rls::ReportAnswer::Counted => Delivery::Answered(Vec::new()),
            },
            3 | 12 => Delivery::Refused,
            _ => Delivery::Retry,
        }
    }

    /// The RLS API reads `hits_addend: 0` as 1.
    fn reservation(&self, wanted: u64) -> u64 {
        wanted.max(1)
    }

    fn releases(&self) -> bool {
        false
    }

    fn batching(&self) -> (usize, usize) {
        (1, 8)
    }
}

/// gRPC's UNAVAILABLE: what a call that ended without a status is taken as.
const GRPC_UNAVAILABLE: u32 = 14;

/// A report call's HTTP status (`None`: no response headers); per-report outcomes from the
/// body of a 2xx.
fn http_delivery(status: Option<u32>, outcomes: impl FnOnce() -> Vec<Outcome>) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Answered(outcomes()),
        Some(408 | 429) | Some(500..) | None => Delivery::Retry,
        Some(_) => Delivery::Refused,
    }
}

fn outcomes(body: &[u8]) -> Vec<Outcome> {
    serde_json::from_slice::<wire::ReportResponse>(body)
        .map(|r| r.results.into_iter().map(|r| r.outcome).collect())
        .unwrap_or_default()
}

/// A decision is an HTTP 200; the failure kind of anything else.
fn http_decision(status: Option<u32>) -> Result<(), CheckFailure> {
    match status {
        None => Err(CheckFailure::Reset),
        Some(200) => Ok(()),
        Some(504) => Err(CheckFailure::Timeout),
        Some(503) => Err(CheckFailure::Unavailable),
        Some(408 | 429) => Err(CheckFailure::Status),
        Some(400..=499) => Err(CheckFailure::Rejected),
        Some(_) => Err(CheckFailure::Status),
    }
}

/// The service's own words on a refused check (`{"error": "…"}`), for the log, bounded.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Error {
        error: String,
    }
    let text = match serde_json::from_slice::<Error>(body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let mut cut = text.len().min(512);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.get(..cut).unwrap_or_default().to_string()
}

fn read_v1(body: &[u8]) -> Result<Verdict, CheckFailure> {
    let a: wire::CheckResponse = serde_json::from_slice(body).map_err(|_| CheckFailure::Body)?;
    let quota = a
        .limits
        .iter()
        .filter(|l| l.currency.is_none())
        .map(|l| Quota {
            limit: l.tokens,
            remaining: l.remaining.min(l.tokens),
            reset_ms: l.reset_ms,
        })
        .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_ms)));
    let denier = |l: &&wire::LimitStatus| a.allowed || a.denied_by.as_deref() == Some(&l.limit);
    let spend = a
        .limits
        .iter()
        .filter(|l| l.currency.is_some())
        .filter(denier)
        .min_by_key(|l| (l.remaining.min(l.tokens), std::cmp::Reverse(l.reset_ms)))
        .map(|l| MoneyQuota {
            limit: l.tokens,
            remaining: l.remaining.min(l.tokens),
            reset_ms: l.reset_ms,
            currency: l.currency.clone().unwrap_or_default(),
            name: l.limit.clone(),
            value: l.value.clone(),
            window_s: l.window_s,
            period: l.period,
            resets_at: l.resets_at.clone(),
        });
    Ok(Verdict {
        allowed: a.allowed,
        quota,
        spend,
        retry_after_ms: a.retry_after_ms,
        denied_by: a.denied_by,
        description: None,
        reserved_at_ms: a.reserved_at_ms,
    })
}

fn read_asm(body: &[u8]) -> Result<Verdict, CheckFailure> {
    let a: wire::AsmCheckResponse = serde_json::from_slice(body).map_err(|_| CheckFailure::Body)?;
    Ok(Verdict {
        allowed: a.allow,
        quota: None,
        spend: None,
        retry_after_ms: 0,
        denied_by: None,
        description: Some(a.description).filter(|d| !d.is_empty()),
        reserved_at_ms: None,
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;

    fn check_call(
        service: &ServiceConfig,
        ds: &[Descriptor],
        reserve: u64,
        id: Option<&str>,
    ) -> Outbound {
        service
            .protocol
            .wire()
            .check_call(service, ds, reserve, 0, id)
    }

    fn report_call(service: &ServiceConfig, reports: &[&Report]) -> Option<Outbound> {
        service.protocol.wire().report_call(service, reports)
    }

    fn read_check(p: Protocol, status: Option<u32>, body: &[u8]) -> Result<Verdict, CheckFailure> {
        p.wire().read_check(status, body)
    }

    fn descriptors() -> Vec<Descriptor> {
        vec![
            Descriptor {
                limit: "apikey".into(),
                value: "k\"1".into(),
                rates: vec![Rate {
                    tokens: 10,
                    window_s: 60,
                    ..Default::default()
                }],
                shared: false,
                ..Default::default()
            },
            Descriptor {
                limit: "user-type".into(),
                value: "regular-user".into(),
                rates: vec![],
                shared: false,
                ..Default::default()
            },
        ]
    }

    fn service(protocol: Protocol) -> ServiceConfig {
        ServiceConfig {
            cluster: "rl".into(),
            authority: "rl".into(),
            protocol,
            timeout_ms: 500,
            failure_mode: crate::config::FailureMode::Allow,
            failure_status: 503,
            domain: "llm".into(),
            descriptor_entries: vec![],
            api_key: None,
        }
    }

    fn http(o: Option<Outbound>) -> Call {
        match o {
            Some(Outbound::Http(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_check_body() {
        let call = http(Some(check_call(
            &service(Protocol::V1),
            &descriptors(),
            5,
            None,
        )));
        assert_eq!((call.method, call.path.as_str()), ("POST", "/v1/check"));
        assert_eq!(
            String::from_utf8(call.body.unwrap()).unwrap(),
            r#"{"descriptors":[{"limit":"apikey","value":"k\"1","rates":[{"tokens":10,"window_s":60}]},{"limit":"user-type","value":"regular-user"}],"reserve":5}"#
        );
        let call = http(Some(check_call(
            &service(Protocol::V1),
            &[],
            5,
            Some("ab-1"),
        )));
        assert_eq!(
            String::from_utf8(call.body.unwrap()).unwrap(),
            r#"{"descriptors":[],"reserve":5,"id":"ab-1"}"#
        );
    }

    #[test]
    fn report_bodies() {
        let report = Report {
            id: "ab-1".into(),
            descriptors: descriptors(),
            tokens: 105,
            reserved: 20,
            reserved_at_ms: Some(1_700_000_000_000),
            release: None,
            usage: Some(wire::UsageFigures {
                prompt_tokens: 10,
                completion_tokens: 95,
                total_tokens: 105,
                ..Default::default()
            }),
            ..Default::default()
        };
        let call = http(report_call(&service(Protocol::V1), &[&report]));
        assert_eq!((call.method, call.path.as_str()), ("POST", "/v1/report"));
        assert_eq!(
            String::from_utf8(call.body.unwrap()).unwrap(),
            r#"{"reports":[{"id":"ab-1","descriptors":[{"limit":"apikey","value":"k\"1","rates":[{"tokens":10,"window_s":60}]},{"limit":"user-type","value":"regular-user"}],"tokens":105,"reserved":20,"reserved_at_ms":1700000000000,"usage":{"prompt_tokens":10,"completion_tokens":95,"total_tokens":105}}]}"#
        );
        let call = http(report_call(&service(Protocol::Asm), &[&report]));
        assert_eq!(call.path, "/update_ratelimit_record");
        assert_eq!(
            String::from_utf8(call.body.unwrap()).unwrap(),
            r#"{"ratelimit_keys":["k\"1","regular-user"],"prompt_tokens":10,"completion_tokens":95,"total_tokens":105}"#
        );
        match report_call(&service(Protocol::EnvoyRls), &[&report]) {
            Some(Outbound::Grpc(m)) => {
                let m = <crate::rls::RateLimitRequest as crate::rls::Message>::decode(m.as_slice())
                    .unwrap();
                assert_eq!((m.domain.as_str(), m.hits_addend), ("llm", 85));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn asm_check_query() {
        let call = http(Some(check_call(
            &service(Protocol::Asm),
            &descriptors(),
            0,
            None,
        )));
        assert_eq!(call.method, "GET");
        assert_eq!(call.body, None);
        assert_eq!(
            call.path,
            "/ratelimit?ratelimit_keys=%5B%22k%5C%221%22%2C%22regular-user%22%5D"
        );
    }

    #[test]
    fn v1_answer_picks_most_constrained_rate() {
        let body = br#"{"allowed":false,"limits":[
            {"limit":"a","value":"x","tokens":100,"window_s":60,"remaining":40,"reset_ms":1000},
            {"limit":"b","value":"y","tokens":10,"window_s":60,"remaining":-5,"reset_ms":42000}],
            "retry_after_ms":41500,"denied_by":"b"}"#;
        let v = read_check(Protocol::V1, Some(200), body).unwrap();
        assert!(!v.allowed);
        assert_eq!(
            v.quota,
            Some(Quota {
                limit: 10,
                remaining: 0,
                reset_ms: 42000
            })
        );
        assert_eq!(v.retry_after_ms, 41500);
        assert_eq!(v.denied_by.as_deref(), Some("b"));
        let ok = read_check(Protocol::V1, Some(200), br#"{"allowed":true}"#).unwrap();
        assert!(ok.allowed && ok.quota.is_none());
    }

    #[test]
    fn asm_answer() {
        let v = read_check(
            Protocol::Asm,
            Some(200),
            br#"{"allow":false,"description":"regular-user is being rate-limited"}"#,
        )
        .unwrap();
        assert!(!v.allowed);
        assert_eq!(
            v.description.as_deref(),
            Some("regular-user is being rate-limited")
        );
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            read_check(Protocol::V1, None, b""),
            Err(CheckFailure::Reset)
        );
        assert_eq!(
            read_check(Protocol::V1, Some(504), b""),
            Err(CheckFailure::Timeout)
        );
        assert_eq!(
            read_check(Protocol::V1, Some(503), b""),
            Err(CheckFailure::Unavailable)
        );
        assert_eq!(
            read_check(Protocol::V1, Some(500), b"{}"),
            Err(CheckFailure::Status)
        );
        assert_eq!(
            read_check(Protocol::V1, Some(429), b"{}"),
            Err(CheckFailure::Status)
        );
        assert_eq!(
            read_check(
                Protocol::V1,
                Some(400),
                br#"{"error":"reserve must be at most 1"}"#
            ),
            Err(CheckFailure::Rejected)
        );
        assert_eq!(
            read_check(Protocol::Asm, Some(413), b""),
            Err(CheckFailure::Rejected)
        );
        assert_eq!(
            error_message(br#"{"error":"reserve must be at most 1"}"#),
            "reserve must be at most 1"
        );
        assert_eq!(error_message("é".repeat(600).as_bytes()).len(), 512);
        assert_eq!(
            read_check(Protocol::V1, Some(200), b"<html>"),
            Err(CheckFailure::Body)
        );
        assert_eq!(
            read_check(Protocol::V1, Some(200), br#"{"allowed":"yes"}"#),
            Err(CheckFailure::Body)
        );
        assert_eq!(
            read_check(Protocol::Asm, Some(200), br#"{"allowed":true}"#),
            Err(CheckFailure::Body)
        );
    }

    #[test]
    fn report_deliveries() {
        assert_eq!(V1.read_delivery(Some(200), b""), Delivery::Answered(vec![]));
        assert_eq!(
            V1.read_delivery(
                Some(200),
                br#"{"accepted":1,"duplicates":0,"results":[{"outcome":"rejected","error":"x"}]}"#
            ),
            Delivery::Answered(vec![Outcome::Rejected])
        );
        assert_eq!(V1.read_delivery(None, b""), Delivery::Retry);
        assert_eq!(V1.read_delivery(Some(503), b""), Delivery::Retry);
        assert_eq!(V1.read_delivery(Some(429), b""), Delivery::Retry);
        assert_eq!(V1.read_delivery(Some(400), b""), Delivery::Refused);
        assert_eq!(V1.read_delivery(Some(413), b""), Delivery::Refused);
        assert_eq!(
            Asm.read_delivery(Some(200), b"{}"),
            Delivery::Answered(vec![])
        );
        assert_eq!(
            EnvoyRls.read_delivery(Some(0), b""),
            Delivery::Answered(vec![])
        );
        assert_eq!(EnvoyRls.read_delivery(Some(3), b""), Delivery::Refused);
        assert_eq!(EnvoyRls.read_delivery(None, b""), Delivery::Retry);
    }
}
