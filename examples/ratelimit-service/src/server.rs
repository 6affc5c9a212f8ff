//! The HTTP front: routes, body limits, JSON errors, and a graceful shutdown that stops
//! accepting, lets in-flight requests finish, then returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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

use crate::api::{AsmUpdate, BadRequest, CheckRequest, ReportRequest};
use crate::clock::Clock;
use crate::limiter::{Failure, Limiter};
use crate::store::Store;

/// The largest request body read; larger ones get 413 without being buffered.
pub const MAX_BODY: usize = wire::MAX_BODY_BYTES;

/// How long a client may take to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

type Reply = Response<Full<Bytes>>;

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    limiter: Arc<Limiter>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head is dropped instead of holding a connection.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
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
                let limiter = limiter.clone();
                let service = service_fn(move |req| {
                    let limiter = limiter.clone();
                    async move { Ok::<_, Infallible>(route(&limiter, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
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

/// Reads and parses a JSON body, refusing one over [`MAX_BODY`].
async fn body_json<T: serde::de::DeserializeOwned>(
    limiter: &Limiter,
    req: Request<Incoming>,
) -> Result<T, Reply> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            crate::metrics::inc(&limiter.metrics.bad_requests);
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
        crate::metrics::inc(&limiter.metrics.bad_requests);
        error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"))
    })
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn route(limiter: &Limiter, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/check") => match body_json::<CheckRequest>(limiter, req).await {
            Ok(body) => limiter
                .check(&body)
                .await
                .map_or_else(failure, |a| json(StatusCode::OK, &a)),
            Err(reply) => reply,
        },
        (Method::POST, "/v1/report") => match body_json::<ReportRequest>(limiter, req).await {
            Ok(body) => limiter
                .report(&body)
                .await
                .map_or_else(failure, |a| json(StatusCode::OK, &a)),
            Err(reply) => reply,
        },
        (Method::GET, "/ratelimit") => {
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
                    crate::metrics::inc(&limiter.metrics.bad_requests);
                    error(
                        StatusCode::BAD_REQUEST,
                        "ratelimit_keys must be a JSON array of strings",
                    )
                }
            }
        }
        (Method::POST, "/update_ratelimit_record") => {
            match body_json::<AsmUpdate>(limiter, req).await {
                Ok(body) => limiter
                    .asm_update(&body)
                    .await
                    .map_or_else(failure, |_| json(StatusCode::OK, &serde_json::json!({}))),
                Err(reply) => reply,
            }
        }
        (Method::GET, "/v1/quota") => {
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
                                v["budget_amount"] = wire::format_micros(m.tokens).into();
                                v["remaining_amount"] = wire::format_micros(m.remaining).into();
                                v["spent_amount"] =
                                    wire::format_micros(m.tokens.saturating_sub(m.remaining))
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
        (Method::GET, "/console") => {
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
        (Method::GET, "/v1/console/overview") => answer(crate::console::overview(limiter).await),
        (Method::GET, "/v1/console/top") => {
            let k = query_param(&req, "k");
            answer(crate::console::top(limiter, k.as_deref()).await)
        }
        (Method::GET, "/v1/console/denials") => answer(crate::console::denials(limiter).await),
        (Method::GET, "/v1/console/search") => {
            let value = query_param(&req, "value");
            answer(crate::console::search(limiter, value.as_deref()).await)
        }
        (Method::POST, "/v1/admin/grant" | "/v1/admin/reset") => {
            if let Err(refused) = crate::console::authorize(limiter, &req) {
                return answer(refused);
            }
            let method = req.method().clone();
            match body_json::<crate::console::Action>(limiter, req).await {
                Ok(action) => answer(crate::console::act(limiter, &method, &path, action).await),
                Err(reply) => reply,
            }
        }
        // Only with --manual-clock: the system clock cannot be moved.
        (Method::POST, "/v1/clock") if matches!(limiter.clock, Clock::Manual(_)) => {
            match query_param(&req, "advance_ms").and_then(|v| v.parse::<i64>().ok()) {
                Some(ms) if ms >= 0 => {
                    limiter.clock.advance(ms);
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"now_ms": limiter.clock.now_ms()}),
                    )
                }
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "give advance_ms=<milliseconds ≥ 0>",
                ),
            }
        }
        (Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (Method::GET, "/readyz") => match limiter.store.ready().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        },
        (Method::GET, "/metrics") => {
            let live = match &limiter.store {
                Store::Memory(m) => Some((m.len(), m.evicted(), m.sources())),
                Store::Redis(_) => None,
            };
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                limiter.metrics.render(limiter.store.name(), live),
            )
        }
        (
            _,
            "/v1/check"
            | "/v1/report"
            | "/ratelimit"
            | "/update_ratelimit_record"
            | "/v1/quota"
            | "/console"
            | "/v1/console/overview"
            | "/v1/console/top"
            | "/v1/console/denials"
            | "/v1/console/search"
            | "/v1/admin/grant"
            | "/v1/admin/reset"
            | "/healthz"
            | "/readyz"
            | "/metrics",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}
