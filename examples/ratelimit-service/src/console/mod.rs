//! The operator console: one page embedded in the binary (`/console`, plain HTML, CSS and JS,
//! nothing fetched from elsewhere, so it works on an air-gapped cluster), the JSON endpoints it
//! reads (also for scripts), and the admin API it acts through, behind a bearer token.
//!
//! What it shows is fed by the limiter into one sink ([`insights::Insights`]), kept in process
//! ([`board`]) or in Redis ([`redis`]); the handlers here only read it back, and look up the
//! meters of the keys they show.

use std::sync::atomic::Ordering::Relaxed;

use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

use crate::limiter::{Failure, Limiter};
use crate::metrics::inc;
use crate::state::AppState;
use board::Heavy;
use wire::LimitStatus;

pub mod board;
pub mod insights;
pub mod redis;

/// The page; its script polls the endpoints below every two seconds.
pub const PAGE: &str = include_str!("console.html");

/// Keys shown per limit by default, and at most.
const TOP_DEFAULT: usize = 10;

/// What a route answers: a status and a JSON body (the server turns it into a response).
pub type Answer = (StatusCode, serde_json::Value);

/// `GET /v1/console/overview`: tokens and money per minute over 15 minutes, and the service's
/// counters (the page turns two readings into rates).
pub async fn overview(state: &AppState) -> Answer {
    let limiter = state.limiter();
    let now = limiter.clock().now_ms();
    let m = limiter.metrics();
    let counters = serde_json::json!({
        "checks_allowed": m.checks_allowed.load(Relaxed),
        "checks_denied": m.checks_denied.load(Relaxed),
        "checks_failed": m.checks_failed.load(Relaxed),
        "reports_accepted": m.reports_accepted.load(Relaxed),
        "reports_failed": m.reports_failed.load(Relaxed),
        "reports_rejected": m.reports_rejected.load(Relaxed),
        "store_errors": m.store_errors.load(Relaxed),
    });
    match limiter.insights().timeline(now).await {
        Ok(timeline) => (
            StatusCode::OK,
            serde_json::json!({"now_ms": now, "store": limiter.store().name(), "timeline": timeline, "counters": counters}),
        ),
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/console/top?k=N`: per limit, the N heaviest keys and their meters now.
pub async fn top(state: &AppState, k: Option<&str>) -> Answer {
    let k = k
        .and_then(|k| k.parse().ok())
        .unwrap_or(TOP_DEFAULT)
        .clamp(1, board::TOP_K);
    match ranking(state.limiter(), k).await {
        Ok(limits) => (StatusCode::OK, serde_json::json!({ "limits": limits })),
        Err(f) => failure(f),
    }
}

/// `GET /v1/console/denials`: the last denials, newest first.
pub async fn denials(state: &AppState) -> Answer {
    match state.limiter().insights().denials().await {
        Ok(d) => (StatusCode::OK, serde_json::json!({ "denials": d })),
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/console/alerts`: the last alerts raised, newest first.
pub async fn alerts(state: &AppState) -> Answer {
    match state.limiter().insights().alerts().await {
        Ok(a) => (StatusCode::OK, serde_json::json!({ "alerts": a })),
        Err(e) => unavailable(e),
    }
}

/// `GET /v1/console/search?value=V`: every meter of V under every limit seen.
pub async fn search(state: &AppState, value: Option<&str>) -> Answer {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return bad("give value=<key value>");
    };
    match find(state.limiter(), value).await {
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
pub fn authorize<B>(state: &AppState, req: &Request<B>) -> Result<(), Answer> {
    if !state.access().admin_enabled() {
        return Err((
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "the admin API is disabled; start the service with --admin-token (RATELIMIT_ADMIN_TOKEN)"}),
        ));
    }
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if state
        .access()
        .allows(crate::auth::Need::Admin, crate::auth::bearer(header))
    {
        Ok(())
    } else {
        inc(&state.limiter().metrics().admin_unauthorized);
        Err((
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "a valid `Authorization: Bearer <admin token>` is required"}),
        ))
    }
}

/// `POST /v1/admin/grant` and `/v1/admin/reset`, once authorized.
pub async fn act(state: &AppState, method: &Method, path: &str, action: Action) -> Answer {
    let limiter = state.limiter();
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
                &limiter.metrics().admin_grants
            } else {
                &limiter.metrics().admin_resets
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

fn failure(f: Failure) -> Answer {
    match f {
        Failure::Bad(b) => bad(&b.0),
        Failure::Store(e) => unavailable(e),
    }
}

/// The console's ranking: every limit seen, its `n` heaviest keys, and each one's meters now.
async fn ranking(limiter: &Limiter, n: usize) -> Result<Vec<RankedLimit>, Failure> {
    let top = limiter
        .insights()
        .top(n)
        .await
        .map_err(|e| limiter.store_failed(e))?;
    let mut out = Vec::with_capacity(top.len());
    // One store lookup per key shown: at most this many per page, whatever the limits.
    let mut lookups = MAX_RANKING_LOOKUPS;
    for (limit, keys) in top {
        let mut ranked = Vec::with_capacity(keys.len());
        for heavy in keys {
            let meters = if lookups > 0 {
                lookups -= 1;
                limiter.quota(&limit, &heavy.value, heavy.shared).await?
            } else {
                Vec::new()
            };
            ranked.push(RankedKey { heavy, meters });
        }
        out.push(RankedLimit { limit, top: ranked });
    }
    Ok(out)
}

/// Every meter a key value has, under every limit the console has seen.
async fn find(limiter: &Limiter, value: &str) -> Result<Vec<Found>, Failure> {
    let limits = limiter
        .insights()
        .top(0)
        .await
        .map_err(|e| limiter.store_failed(e))?;
    let mut found = Vec::new();
    for (limit, _) in limits {
        for shared in [false, true] {
            let meters = limiter.quota(&limit, value, shared).await?;
            if !meters.is_empty() {
                found.push(Found {
                    limit: limit.clone(),
                    shared,
                    meters,
                });
            }
        }
    }
    Ok(found)
}

/// The most meter lookups one ranking makes (the console's top list): the keys past it are
/// listed with their counts and without meters.
pub const MAX_RANKING_LOOKUPS: usize = 100;

/// A limit's heaviest keys with their meters now.
#[derive(Debug, Serialize)]
pub struct RankedLimit {
    pub limit: String,
    pub top: Vec<RankedKey>,
}

#[derive(Debug, Serialize)]
pub struct RankedKey {
    #[serde(flatten)]
    pub heavy: Heavy,
    pub meters: Vec<LimitStatus>,
}

/// A counter a searched value has.
#[derive(Debug, Serialize)]
pub struct Found {
    pub limit: String,
    pub shared: bool,
    pub meters: Vec<LimitStatus>,
}
