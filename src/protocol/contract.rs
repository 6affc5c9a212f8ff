//! What every wire protocol answers ([`Wire`]), and the calls it makes for the adapter to send.

use crate::config::ServiceConfig;
use crate::lease::Ask;
use crate::limits::Descriptor;
use crate::report::{Delivery, Report};
use crate::verdict::{CheckFailure, Verdict};

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
    /// The check for `descriptors`, reserving `reserve` from each on admission (tokens, or
    /// micro units from those that count money); `id` names it for a later release
    /// (protocols with [`Wire::releases`]).
    fn check_call(
        &self,
        service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: wire::Amount,
        trim: Option<&wire::Trim>,
        id: Option<&str>,
    ) -> Outbound;

    /// The check that asks for a quota lease ([`Ask`]); `None` for a protocol without leases.
    fn lease_call(&self, _ask: &Ask) -> Option<Outbound> {
        None
    }

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
