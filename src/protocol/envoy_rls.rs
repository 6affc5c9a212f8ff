//! Envoy's rate-limit gRPC service (`ShouldRateLimit`), through the messages of [`crate::rls`].

use super::contract::{Outbound, Wire};
use crate::config::ServiceConfig;
use crate::limits::Descriptor;
use crate::report::{Delivery, Report};
use crate::rls;
use crate::verdict::{CheckFailure, Verdict};

/// Envoy's rate-limit gRPC service (`ShouldRateLimit`): every check counts at least one hit,
/// a report adds what the request used beyond its reservation, nothing is given back.
pub struct EnvoyRls;

impl Wire for EnvoyRls {
    fn check_call(
        &self,
        service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: wire::Amount,
        _trim: Option<&wire::Trim>,
        _id: Option<&str>,
    ) -> Outbound {
        Outbound::Grpc(rls::check_message(
            &service.domain,
            &service.descriptor_entries,
            descriptors,
            reserve.tokens,
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
            r.used.less(r.reserved).tokens,
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
