//! Engines that speak Envoy's rate-limit gRPC protocol (`ShouldRateLimit` over h2c) to the
//! plugin under `service.protocol: "envoy-rls"`: [`Rls`] answers whatever a test tells it, and
//! [`limitador`] answers as `limitador-server` does, with the `limitador` crate (Kuadrant's
//! engine, from crates.io) deciding.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use limitador::limit::{Context, Expression, Limit, Predicate};
use limitador::RateLimiter;
use wire::rls::{
    HeaderValue, Message, RateLimitRequest, RateLimitResponse, CODE_OK, CODE_OVER_LIMIT,
};

/// What an engine answers: a response, or a gRPC error status.
#[derive(Clone)]
pub enum Answer {
    Reply(RateLimitResponse),
    Error(u32),
}

type Handler = Arc<dyn Fn(&RateLimitRequest) -> Answer + Send + Sync>;

/// A gRPC rate-limit server on a free port, recording every call.
pub struct Rls {
    pub port: u16,
    seen: Arc<Mutex<Vec<RateLimitRequest>>>,
    /// The `authorization` metadata of each call.
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
}

impl Rls {
    pub fn start(handler: impl Fn(&RateLimitRequest) -> Answer + Send + Sync + 'static) -> Rls {
        let handler: Handler = Arc::new(handler);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let record = seen.clone();
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let auth = authorizations.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (handler, record, auth) = (handler.clone(), record.clone(), auth.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            auth.lock().unwrap().push(
                                req.headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from),
                            );
                            answer(req, handler.clone(), record.clone())
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Rls {
            port,
            seen,
            authorizations,
        }
    }

    pub fn seen(&self) -> Vec<RateLimitRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.authorizations.lock().unwrap().clone()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    handler: Handler,
    record: Arc<Mutex<Vec<RateLimitRequest>>>,
) -> Result<Response<Body>, Infallible> {
    assert_eq!(
        req.uri().path(),
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // A gRPC frame: compressed flag, 4-byte length, the message.
    let message = RateLimitRequest::decode(&body[5..]).unwrap();
    let outcome = handler(&message);
    record.lock().unwrap().push(message);
    let mut trailers = hyper::HeaderMap::new();
    let data = match outcome {
        Answer::Reply(resp) => {
            trailers.insert("grpc-status", "0".parse().unwrap());
            let bytes = resp.encode_to_vec();
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            frame.extend_from_slice(&bytes);
            frame
        }
        Answer::Error(code) => {
            trailers.insert("grpc-status", code.to_string().parse().unwrap());
            Vec::new()
        }
    };
    let body = Full::new(Bytes::from(data))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap())
}

/// A limit of `max` hits per `seconds` (Limitador's fixed window, from the first hit) for each
/// value of the descriptor entry `key`, the plugin's limit name.
pub struct LimitadorLimit<'a> {
    pub key: &'a str,
    pub max: u64,
    pub seconds: u64,
}

/// Limitador as `limitador-server` runs it (memory storage), behind the RLS server: what its
/// `envoy_rls` service does with a `ShouldRateLimit`, step for step. The domain is the
/// namespace (empty: UNKNOWN); each descriptor becomes one map of `descriptors`; a
/// `hits_addend` of 0 counts 1; `check_rate_limited_and_update` decides, so a call that would
/// pass any limit is OVER_LIMIT and counts nothing; `statuses` is always empty; with
/// `headers` (`--rate-limit-headers DRAFT_VERSION_03`) the most constrained counter's
/// `X-RateLimit-*` go in `response_headers_to_add`, sorted by name; a storage error is
/// UNAVAILABLE.
pub fn limitador(
    domain: &str,
    limits: &[LimitadorLimit<'_>],
    headers: bool,
) -> (Rls, Arc<RateLimiter>) {
    let limiter = Arc::new(RateLimiter::new(10_000));
    for l in limits {
        // `descriptors[0]`: the plugin sends one descriptor per limit that applies, and these
        // tests apply one.
        let mut limit = Limit::new(
            domain,
            l.max,
            l.seconds,
            [Predicate::parse(format!("'{}' in descriptors[0]", l.key)).unwrap()],
            [Expression::parse(format!("descriptors[0]['{}']", l.key)).unwrap()],
        );
        limit.set_name(l.key.to_string());
        limiter.add_limit(limit);
    }
    let engine = limiter.clone();
    let rls = Rls::start(move |req| {
        if req.domain.is_empty() {
            return Answer::Reply(RateLimitResponse::default());
        }
        let values: Vec<HashMap<String, String>> = req
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let hits = u64::from(req.hits_addend.max(1));
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_string(), values);
        let Ok(mut result) =
            engine.check_rate_limited_and_update(&req.domain.clone().into(), &ctx, hits)
        else {
            return Answer::Error(14);
        };
        let mut response_headers_to_add: Vec<HeaderValue> = if headers {
            result
                .response_header()
                .into_iter()
                .map(|(key, value)| HeaderValue { key, value })
                .collect()
        } else {
            Vec::new()
        };
        response_headers_to_add.sort_by(|a, b| a.key.cmp(&b.key));
        Answer::Reply(RateLimitResponse {
            overall_code: if result.limited {
                CODE_OVER_LIMIT
            } else {
                CODE_OK
            },
            statuses: Vec::new(),
            response_headers_to_add,
        })
    });
    (rls, limiter)
}

/// What Limitador has counted for `value` of limit `key` in `domain` (0 before any hit).
pub fn limitador_count(limiter: &RateLimiter, domain: &str, key: &str, value: &str) -> u64 {
    limiter
        .get_counters(&domain.to_string().into())
        .unwrap()
        .into_iter()
        .find(|c| c.limit().name() == Some(key) && c.set_variables().values().any(|v| v == value))
        .map_or(0, |c| {
            c.max_value() - c.remaining().unwrap_or(c.max_value())
        })
}
