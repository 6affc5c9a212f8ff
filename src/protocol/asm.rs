//! The ASM example service's protocol: `GET /ratelimit` and `POST /update_ratelimit_record`.

use super::contract::{Call, Outbound, Wire};
use super::http::{http_decision, http_delivery, url_encode};
use crate::config::ServiceConfig;
use crate::limits::Descriptor;
use crate::report::{Delivery, Report};
use crate::verdict::{CheckFailure, Verdict};

/// The ASM example service's `GET /ratelimit` and `POST /update_ratelimit_record`: no
/// reservations, no figures, no ids; one request's usage per report call.
pub struct Asm;

impl Wire for Asm {
    fn check_call(
        &self,
        _service: &ServiceConfig,
        descriptors: &[Descriptor],
        _reserve: wire::Amount,
        _trim: Option<&wire::Trim>,
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
                total_tokens: r.used.tokens,
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

fn read_asm(body: &[u8]) -> Result<Verdict, CheckFailure> {
    let a: wire::AsmCheckResponse = crate::config::read_json(body).ok_or(CheckFailure::Body)?;
    Ok(Verdict {
        allowed: a.allow,
        quota: None,
        spend: None,
        retry_after_ms: 0,
        denied_by: None,
        description: Some(a.description).filter(|d| !d.is_empty()),
        reserved_at_ms: None,
        granted: None,
        shadow_denied: Vec::new(),
        lease: None,
    })
}
