//! The operator console: one page embedded in the binary (`/console`, plain HTML, CSS and JS,
//! nothing fetched from elsewhere, so it works on an air-gapped cluster), the JSON endpoints it
//! reads (also for scripts), and the admin API it acts through, behind a bearer token.

use std::sync::atomic::Ordering::Relaxed;

use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use crate::limiter::Limiter;
use crate::metrics::inc;

/// The page; its script polls the endpoints below every two seconds.
pub const PAGE: &str = include_str!("console.html");

/// Keys shown per limit by default, and at most.
const TOP_DEFAULT: usize = 10;

/// What a route answers: a status and a JSON body (the server turns it into a response).
pub type Answer = (StatusCode, serde_json::Value);

/// `GET /v1/console/overview`: tokens and money per minute over 15 minutes, and the service's
/// counters (the page turns two readings into rates).
pub async fn overview(limiter: &Limiter) -> Answer {
    let now = limiter.clock.now_ms();
    let m = &limiter.metrics;
    let counters = serde_json::json!({
        "checks_allowed": m.checks_allowed.load(Relaxed),
        "checks_denied": m.checks_denied.load(Relaxed),
        "checks_failed": m.checks_failed.load(Relaxed),
        "reports_accepted": m.reports_accepted.load(Relaxed),
        "reports_failed": m.reports_failed.load(Relaxed),
        "reports_rejected": m.reports_rejected.load(Relaxed),
        "store_errors": m.store_errors.load(Relaxed),
    });
    match limiter.store.timeline(now).await {
        Ok(timeline) => (
            StatusCode::OK,
            serde_json::json!({"now_ms": now, "store": limiter.store.name(), "timeline": timeline, "counters": counters}),
        ),
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/console/top?k=N`: per limit, the N heaviest keys and their meters now.
pub async fn top(limiter: &Limiter, k: Option<&str>) -> Answer {
    let k = k
        .and_then(|k| k.parse().ok())
        .unwrap_or(TOP_DEFAULT)
        .clamp(1, crate::insights::TOP_K);
    match limiter.ranking(k).await {
        Ok(limits) => (StatusCode::OK, serde_json::json!({ "limits": limits })),
        Err(f) => failure(f),
    }
}

/// `GET /v1/console/denials`: the last denials, newest first.
pub async fn denials(limiter: &Limiter) -> Answer {
    match limiter.store.denials().await {
        Ok(d) => (StatusCode::OK, serde_json::json!({ "denials": d })),
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/console/search?value=V`: every meter of V under every limit seen.
pub async fn search(limiter: &Limiter, value: Option<&str>) -> Answer {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return bad("give value=<key value>");
    };
    match limiter.search(value).await {
        Ok(found) => (
            StatusCode::OK,
            serde_json::json!({"value": value, "counters": found}),
        ),
        Err(f) => failure(f),
    }
}

/// An admin action's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub limit: String,
    pub value: String,
    #[serde(default)]
    pub shared: bool,
    /// `grant`: how much more, in the counter's unit (tokens, or micro units for money).
    #[serde(default)]
    pub amount: Option<u64>,
}

/// Whether a request may act: `Err` is the answer when it may not.
pub fn authorize<B>(limiter: &Limiter, req: &Request<B>) -> Result<(), Answer> {
    if !limiter.access.admin_enabled() {
        return Err((
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "the admin API is disabled; start the service with --admin-token (RATELIMIT_ADMIN_TOKEN)"}),
        ));
    }
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if limiter
        .access
        .allows(crate::auth::Need::Admin, crate::auth::bearer(header))
    {
        Ok(())
    } else {
        inc(&limiter.metrics.admin_unauthorized);
        Err((
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "a valid `Authorization: Bearer <admin token>` is required"}),
        ))
    }
}

/// `POST /v1/admin/grant` and `/v1/admin/reset`, once authorized.
pub async fn act(limiter: &Limiter, method: &Method, path: &str, action: Action) -> Answer {
    let grant = match (method, path) {
        (&Method::POST, "/v1/admin/grant") => match action.amount {
            Some(n) if n > 0 => Some(n),
            _ => return bad("grant needs \"amount\": a positive whole number (tokens, or micro units for a limit in money)"),
        },
        _ => None,
    };
    match limiter
        .adjust(&action.limit, &action.value, action.shared, grant)
        .await
    {
        Ok(meters) => {
            let what = if grant.is_some() { "grant" } else { "reset" };
            inc(if grant.is_some() {
                &limiter.metrics.admin_grants
            } else {
                &limiter.metrics.admin_resets
            });
            tracing::info!(
                limit = action.limit,
                value = action.value,
                shared = action.shared,
                amount = grant,
                meters,
                "admin {what}"
            );
            (
                StatusCode::OK,
                serde_json::json!({"action": what, "limit": action.limit, "value": action.value, "meters_changed": meters}),
            )
        }
        Err(f) => failure(f),
    }
}

fn bad(message: &str) -> Answer {
    (
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": message }),
    )
}

fn unavailable(e: impl std::fmt::Display) -> Answer {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error": e.to_string()}),
    )
}

fn failure(f: crate::limiter::Failure) -> Answer {
    match f {
        crate::limiter::Failure::Bad(b) => bad(&b.0),
        crate::limiter::Failure::Store(e) => unavailable(e),
    }
}
