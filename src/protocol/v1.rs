//! Protocol v1: JSON `/v1/check` and `/v1/report` to this project's rate-limit service.

use super::contract::{Call, Outbound, Wire};
use super::http::{http_decision, http_delivery, outcomes};
use crate::config::ServiceConfig;
use crate::lease::Ask;
use crate::limits::Descriptor;
use crate::report::{Delivery, Report, BATCH};
use crate::verdict::{CheckFailure, MoneyQuota, Quota, Verdict};

/// JSON `/v1/check` and `/v1/report`: reservations given back, reports batched, per-report
/// answers, ids for releases and retries.
pub struct V1;

impl Wire for V1 {
    fn check_call(
        &self,
        _service: &ServiceConfig,
        descriptors: &[Descriptor],
        reserve: wire::Amount,
        trim: Option<&wire::Trim>,
        id: Option<&str>,
    ) -> Outbound {
        Outbound::Http(Call {
            method: "POST",
            path: "/v1/check".into(),
            // Serialising plain structs of strings and integers cannot fail.
            body: serde_json::to_vec(&wire::CheckRequest {
                descriptors,
                reserve,
                id: id.map(str::to_owned),
                trim: trim.copied(),
                lease: None,
            })
            .ok(),
        })
    }

    fn lease_call(&self, ask: &Ask) -> Option<Outbound> {
        Some(Outbound::Http(Call {
            method: "POST",
            path: "/v1/check".into(),
            body: serde_json::to_vec(&wire::CheckRequest {
                descriptors: ask.descriptors.as_slice(),
                reserve: wire::Amount::ZERO,
                id: None,
                trim: None,
                lease: Some(wire::LeaseAsk {
                    id: ask.id.clone(),
                    amount: ask.amount,
                }),
            })
            .ok(),
        }))
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

fn read_v1(body: &[u8]) -> Result<Verdict, CheckFailure> {
    let a: wire::CheckResponse = crate::config::read_json(body).ok_or(CheckFailure::Body)?;
    let quota = a
        .limits
        .iter()
        .filter(|l| l.currency.is_none())
        .map(|l| Quota {
            limit: l.budget,
            remaining: l.remaining.min(l.budget),
            reset_ms: l.reset_ms,
        })
        .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_ms)));
    let denier = |l: &&wire::LimitStatus| a.allowed || a.denied_by.as_deref() == Some(&l.limit);
    let spend = a
        .limits
        .iter()
        .filter(|l| l.currency.is_some())
        .filter(denier)
        .min_by_key(|l| (l.remaining.min(l.budget), std::cmp::Reverse(l.reset_ms)))
        .map(|l| MoneyQuota {
            limit: l.budget,
            remaining: l.remaining.min(l.budget),
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
        granted: a.granted,
        shadow_denied: a.shadow_denied,
        lease: a.lease,
    })
}
