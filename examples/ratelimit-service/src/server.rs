//! The HTTP front: routes, body limits, JSON errors, and a graceful shutdown that stops
//! accepting, lets in-flight requests finish, then returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{AsmUpdate, BadRequest, CheckRequest, ReportRequest};
use crate::auth::Need;
use crate::clock::Clock;
use crate::limiter::{Failure, Limiter};
use crate::metrics::inc;
use crate::settings::ConnectionLimits;
use crate::state::AppState;
use crate::store::Store;

/// The largest request body read; larger ones get 413 without being buffered.
pub const MAX_BODY: usize = wire::MAX_BODY_BYTES;

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

type Reply = Response<Full<Bytes>>;

/// Serves until `shutdown` resolves, then drains in-flight requests.
///
/// Connections are bounded (`limits`): at most `max_connections` at once (a semaphore; more
/// wait in the listen backlog), each closed when it stalls: a new connection that sends no
/// request head within `head_timeout`, a head trickled slower than that, a body not read
/// within `body_timeout` (408), a kept-alive connection idle for `idle_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head is dropped instead of holding a connection.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let activity = Arc::new(Activity::new());
                let metrics = state.clone();
                let (state, seen) = (state.clone(), activity.clone());
                let service = service_fn(move |req| {
                    let (state, seen) = (state.clone(), seen.clone());
                    async move {
                        let _busy = seen.begin();
                        Ok::<_, Infallible>(route(&state, limits.body_timeout, req).await)
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    inc(&metrics.limiter().metrics().connections_opened);
                    tokio::select! {
                        _ = conn => {}
                        () = activity.stalled(limits) => {
                            // Dropping the connection closes its socket.
                            inc(&metrics.limiter().metrics().connections_timed_out);
                        }
                    }
                    inc(&metrics.limiter().metrics().connections_closed);
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {DRAIN:?}");
    }
}

/// What a connection is doing, for its watchdog: requests under way, requests begun, and when
/// it last finished one.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    begun: AtomicU64,
    /// Milliseconds after `opened` when the last request finished.
    last_done_ms: AtomicU64,
}

/// Marks a request finished when dropped (however its handler ends).
struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let at = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_done_ms.store(at, Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(0),
        }
    }

    fn begin(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        self.begun.fetch_add(1, Relaxed);
        Busy(self)
    }

    /// Resolves when the connection has stalled: no request head within `head_timeout` of
    /// opening, or none within `idle_timeout` of the last request. A request under way is the
    /// handler's to bound (its body read has `body_timeout`).
    async fn stalled(&self, limits: ConnectionLimits) {
        loop {
            let deadline = if self.in_flight.load(Relaxed) > 0 {
                self.opened.elapsed() + limits.idle_timeout.min(limits.body_timeout)
            } else if self.begun.load(Relaxed) == 0 {
                limits.head_timeout
            } else {
                Duration::from_millis(self.last_done_ms.load(Relaxed)) + limits.idle_timeout
            };
            let now = self.opened.elapsed();
            if now >= deadline && self.in_flight.load(Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(deadline.saturating_sub(now).max(Duration::from_millis(100))).await;
        }
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({"error": message}))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn answer((status, body): crate::console::Answer) -> Reply {
    json(status, &body)
}

/// `GET /v1/spend`: the ledger's sums, as JSON or (`Accept: text/csv`) CSV.
async fn spend(state: &AppState, req: &Request<Incoming>) -> Reply {
    let limiter = state.limiter();
    let Some(ledger) = limiter.spend_ledger() else {
        return error(
            StatusCode::NOT_FOUND,
            "this service keeps no spend ledger: start it with --ledger postgres://…",
        );
    };
    let query = crate::ledger::SpendQuery::parse(
        query_param(req, "from").as_deref(),
        query_param(req, "to").as_deref(),
        query_param(req, "group_by").as_deref(),
        limiter.clock().now_ms(),
    );
    let query = match query {
        Ok(q) => q,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let rows = match ledger.spend(&query).await {
        Ok(rows) => rows,
        Err(crate::ledger::LedgerError::BadQuery(why)) => {
            return error(StatusCode::BAD_REQUEST, &why)
        }
        Err(e) => {
            tracing::warn!("{e}");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("5"));
            return r;
        }
    };
    let wants_csv = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.to_ascii_lowercase().contains("text/csv"));
    if wants_csv {
        let mut r = text(
            StatusCode::OK,
            "text/csv; charset=utf-8",
            crate::ledger::report::csv(&query, &rows),
        );
        r.headers_mut().insert(
            hyper::header::CONTENT_DISPOSITION,
            hyper::header::HeaderValue::from_static("attachment; filename=\"spend.csv\""),
        );
        return r;
    }
    json(StatusCode::OK, &crate::ledger::report::json(&query, &rows))
}

fn failure(f: Failure) -> Reply {
    match f {
        Failure::Bad(BadRequest(m)) => error(StatusCode::BAD_REQUEST, &m),
        Failure::Store(e) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
            r
        }
    }
}

/// Reads and parses a JSON body, refusing one over [`MAX_BODY`] (413) or one not read within
/// `timeout` (408; the connection then closes).
async fn body_json<T: serde::de::DeserializeOwned>(
    limiter: &Limiter,
    timeout: Duration,
    req: Request<Incoming>,
) -> Result<T, Reply> {
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    let Ok(read) = read.await else {
        inc(&limiter.metrics().bodies_timed_out);
        let mut r = error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("the body was not sent within {timeout:?}"),
        );
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Err(r);
    };
    let bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            inc(&limiter.metrics().bad_requests);
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body larger than {MAX_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("could not read the body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        inc(&limiter.metrics().bad_requests);
        error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"))
    })
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// What each endpoint asks of its caller (see [`crate::auth`]).
/// An endpoint of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Check,
    Report,
    AsmCheck,
    AsmUpdate,
    Quota,
    Spend,
    Console,
    Overview,
    Top,
    Denials,
    Alerts,
    Search,
    Admin,
    Clock,
    Healthz,
    Readyz,
    Metrics,
}

/// Every route: path, method, who may call it. A path it lists with another method is 405, a
/// path it does not list 404, so each is written once.
const ROUTES: &[(&str, Method, Need, Endpoint)] = &[
    ("/v1/check", Method::POST, Need::Data, Endpoint::Check),
    ("/v1/report", Method::POST, Need::Data, Endpoint::Report),
    ("/ratelimit", Method::GET, Need::Data, Endpoint::AsmCheck),
    (
        "/update_ratelimit_record",
        Method::POST,
        Need::Data,
        Endpoint::AsmUpdate,
    ),
    ("/v1/quota", Method::GET, Need::Read, Endpoint::Quota),
    ("/v1/spend", Method::GET, Need::Read, Endpoint::Spend),
    ("/console", Method::GET, Need::Open, Endpoint::Console),
    (
        "/v1/console/overview",
        Method::GET,
        Need::Read,
        Endpoint::Overview,
    ),
    ("/v1/console/top", Method::GET, Need::Read, Endpoint::Top),
    (
        "/v1/console/denials",
        Method::GET,
        Need::Read,
        Endpoint::Denials,
    ),
    (
        "/v1/console/alerts",
        Method::GET,
        Need::Read,
        Endpoint::Alerts,
    ),
    (
        "/v1/console/search",
        Method::GET,
        Need::Read,
        Endpoint::Search,
    ),
    // The admin API checks its own token (and answers 404 when it is disabled).
    ("/v1/admin/grant", Method::POST, Need::Open, Endpoint::Admin),
    ("/v1/admin/reset", Method::POST, Need::Open, Endpoint::Admin),
    // Only with --manual-clock: the system clock cannot be moved.
    ("/v1/clock", Method::POST, Need::Data, Endpoint::Clock),
    ("/healthz", Method::GET, Need::Open, Endpoint::Healthz),
    ("/readyz", Method::GET, Need::Open, Endpoint::Readyz),
    ("/metrics", Method::GET, Need::Open, Endpoint::Metrics),
];

async fn route(state: &AppState, body_timeout: Duration, req: Request<Incoming>) -> Reply {
    let limiter = state.limiter();
    let path = req.uri().path().to_string();
    let manual_clock = matches!(limiter.clock(), Clock::Manual(_));
    let routes: Vec<_> = ROUTES
        .iter()
        .filter(|r| r.0 == path && (r.3 != Endpoint::Clock || manual_clock))
        .collect();
    // A path the service does not serve still needs the key: its answer tells nothing.
    let need = routes.first().map_or(Need::Data, |r| r.2);
    let header = req.headers().get(hyper::header::AUTHORIZATION);
    if !state
        .access()
        .allows(need, crate::auth::bearer(header.map(|v| v.as_bytes())))
    {
        inc(&limiter.metrics().unauthorized);
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer <API key>` is required",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        // A caller without the key keeps no connection open.
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return r;
    }
    let endpoint = match routes.iter().find(|r| r.1 == req.method()) {
        Some(r) => r.3,
        None if routes.is_empty() => return error(StatusCode::NOT_FOUND, "no such endpoint"),
        None => return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    };
    match endpoint {
        Endpoint::Check => match body_json::<CheckRequest>(limiter, body_timeout, req).await {
            Ok(body) => limiter
                .check(&body)
                .await
                .map_or_else(failure, |a| json(StatusCode::OK, &a)),
            Err(reply) => reply,
        },
        Endpoint::Report => match body_json::<ReportRequest>(limiter, body_timeout, req).await {
            Ok(body) => limiter
                .report(&body)
                .await
                .map_or_else(failure, |a| json(StatusCode::OK, &a)),
            Err(reply) => reply,
        },
        Endpoint::AsmCheck => {
            let Some(raw) = query_param(&req, "ratelimit_keys") else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "missing query parameter ratelimit_keys",
                );
            };
            match serde_json::from_str::<Vec<String>>(&raw) {
                Ok(keys) => limiter
                    .asm_check(&keys)
                    .await
                    .map_or_else(failure, |a| json(StatusCode::OK, &a)),
                Err(_) => {
                    inc(&limiter.metrics().bad_requests);
                    error(
                        StatusCode::BAD_REQUEST,
                        "ratelimit_keys must be a JSON array of strings",
                    )
                }
            }
        }
        Endpoint::AsmUpdate => match body_json::<AsmUpdate>(limiter, body_timeout, req).await {
            Ok(body) => limiter
                .asm_update(&body)
                .await
                .map_or_else(failure, |_| json(StatusCode::OK, &serde_json::json!({}))),
            Err(reply) => reply,
        },
        Endpoint::Quota => {
            let (Some(limit), Some(value)) =
                (query_param(&req, "limit"), query_param(&req, "value"))
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give limit= and value= (and shared=true for a shared pool)",
                );
            };
            let shared = query_param(&req, "shared").is_some_and(|s| s == "true");
            match limiter.quota(&limit, &value, shared).await {
                Ok(meters) => {
                    // A meter in money also states its figures as decimals of its currency.
                    let meters: Vec<serde_json::Value> = meters
                        .iter()
                        .map(|m| {
                            let mut v = serde_json::to_value(m).unwrap_or_default();
                            if m.currency.is_some() {
                                v["budget_amount"] = wire::format_micros(m.budget).into();
                                v["remaining_amount"] = wire::format_micros(m.remaining).into();
                                v["spent_amount"] =
                                    wire::format_micros(m.budget.saturating_sub(m.remaining))
                                        .into();
                            }
                            v
                        })
                        .collect();
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"limit": limit, "value": value, "shared": shared, "meters": meters}),
                    )
                }
                Err(f) => failure(f),
            }
        }
        Endpoint::Spend => spend(state, &req).await,
        Endpoint::Console => {
            let mut r = text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::console::PAGE.to_string(),
            );
            r.headers_mut().insert(
                "content-security-policy",
                hyper::header::HeaderValue::from_static(
                    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'",
                ),
            );
            r
        }
        Endpoint::Overview => answer(crate::console::overview(state).await),
        Endpoint::Top => {
            let k = query_param(&req, "k");
            answer(crate::console::top(state, k.as_deref()).await)
        }
        Endpoint::Denials => answer(crate::console::denials(state).await),
        Endpoint::Alerts => answer(crate::console::alerts(state).await),
        Endpoint::Search => {
            let value = query_param(&req, "value");
            answer(crate::console::search(state, value.as_deref()).await)
        }
        Endpoint::Admin => {
            if let Err(refused) = crate::console::authorize(state, &req) {
                return answer(refused);
            }
            let method = req.method().clone();
            match body_json::<crate::console::Action>(limiter, body_timeout, req).await {
                Ok(action) => answer(crate::console::act(state, &method, &path, action).await),
                Err(reply) => reply,
            }
        }
        Endpoint::Clock => {
            match query_param(&req, "advance_ms").and_then(|v| v.parse::<i64>().ok()) {
                Some(ms) if ms >= 0 => {
                    limiter.clock().advance(ms);
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"now_ms": limiter.clock().now_ms()}),
                    )
                }
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "give advance_ms=<milliseconds ≥ 0>",
                ),
            }
        }
        Endpoint::Healthz => text(StatusCode::OK, "text/plain", "ok\n".into()),
        Endpoint::Readyz => match limiter.store().ready().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        },
        Endpoint::Metrics => {
            let live = match limiter.store() {
                Store::Memory(m) => Some((m.len(), m.evicted(), m.sources())),
                Store::Redis(_) => None,
            };
            let mut body = limiter.metrics().render(limiter.store().name(), live);
            if let Some(ledger) = limiter.spend_ledger() {
                ledger.render_metrics(&mut body);
            }
            text(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
    }
}
