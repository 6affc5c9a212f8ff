//! The wire protocols between the plugin and the rate-limit service, each behind one trait
//! ([`Wire`]): what a check sends and how its answer is read, what a report sends and how its
//! delivery is read, what a reservation means, how reports are batched.

mod asm;
mod contract;
mod envoy_rls;
mod http;
mod v1;

pub use crate::verdict::{CheckFailure, MoneyQuota, Quota, Verdict};
pub use contract::{Call, Outbound, Wire};
pub use http::{error_message, url_encode};

use crate::config::Protocol;

impl Protocol {
    pub fn wire(self) -> &'static dyn Wire {
        match self {
            Protocol::V1 => &v1::V1,
            Protocol::Asm => &asm::Asm,
            Protocol::EnvoyRls => &envoy_rls::EnvoyRls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::asm::Asm;
    use super::envoy_rls::EnvoyRls;
    use super::v1::V1;
    use super::*;
    use crate::config::ServiceConfig;
    use crate::limits::Descriptor;
    use crate::limits::Rate;
    use crate::report::{Delivery, Report};
    use wire::Outcome;

    fn check_call(
        service: &ServiceConfig,
        ds: &[Descriptor],
        reserve: u64,
        id: Option<&str>,
    ) -> Outbound {
        service
            .protocol
            .wire()
            .check_call(service, ds, wire::Amount::tokens(reserve), None, id)
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
                    budget: 10,
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
            leases: false,
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
            spend: Vec::new(),
            id: "ab-1".into(),
            descriptors: descriptors(),
            used: wire::Amount::tokens(105),
            reserved: wire::Amount::tokens(20),
            reserved_at_ms: Some(1_700_000_000_000),
            release: None,
            usage: Some(wire::UsageFigures {
                prompt_tokens: 10,
                completion_tokens: 95,
                total_tokens: 105,
                ..Default::default()
            }),
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
