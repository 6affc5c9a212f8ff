//! The load generator: a fixed number of keep-alive HTTP/1.1 connections, each sending its next
//! request as soon as the previous answer is read, latencies in an HDR histogram.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request to send (the plan cycles through them).
#[derive(Clone)]
pub struct Call {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Call {
    pub fn post_json(path: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> Call {
        let mut h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        h.push(("content-type".into(), "application/json".into()));
        Call {
            method: "POST",
            path: path.into(),
            headers: h,
            body: Bytes::from(body.to_string()),
        }
    }
}

/// How long (or how many requests) and how wide.
pub struct Plan {
    pub addr: SocketAddr,
    pub connections: usize,
    /// Measured time; `None` with `total` set.
    pub duration: Option<Duration>,
    /// Stop after this many requests in all.
    pub total: Option<u64>,
    /// Unmeasured time before, to fill pools and caches.
    pub warmup: Duration,
    pub calls: Vec<Call>,
}

pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub elapsed: Duration,
    /// Microseconds.
    pub latency: Histogram<u64>,
    /// Response body bytes read.
    pub bytes: u64,
    /// Per call of the plan, how many were answered 200 (to check balances exactly).
    pub served: Vec<u64>,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn p50_ms(&self) -> f64 {
        self.latency.value_at_quantile(0.5) as f64 / 1000.0
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64 / 1000.0
    }
}

struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

async fn connect(addr: SocketAddr) -> Option<Conn> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(Conn { sender })
}

/// Sends one call; the status and the body's size, or `None` on a transport error.
async fn send(conn: &mut Conn, addr: SocketAddr, call: &Call) -> Option<(u16, u64)> {
    let mut req = Request::builder()
        .method(call.method)
        .uri(call.path.as_str())
        .header("host", addr.to_string());
    for (k, v) in &call.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(call.body.clone())).ok()?;
    conn.sender.ready().await.ok()?;
    let resp = conn.sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body.len() as u64))
}

/// Runs `plan` on the current Tokio runtime.
pub async fn run(plan: Plan) -> Outcome {
    let calls = Arc::new(plan.calls);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = plan.duration.map(|d| measure_from + d);
    let budget = plan
        .total
        .map(|t| Arc::new(std::sync::atomic::AtomicI64::new(t as i64)));
    let mut tasks = Vec::new();
    for worker in 0..plan.connections.max(1) {
        let (calls, budget, addr) = (calls.clone(), budget.clone(), plan.addr);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let (mut requests, mut errors, mut bytes) = (0u64, 0u64, 0u64);
            let mut statuses = BTreeMap::new();
            let mut served = vec![0u64; calls.len()];
            let mut conn = None;
            let mut i = worker;
            loop {
                let now = Instant::now();
                if until.is_some_and(|u| now >= u) {
                    break;
                }
                if let Some(b) = &budget {
                    if b.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
                        break;
                    }
                }
                if conn.is_none() {
                    conn = connect(addr).await;
                }
                let Some(c) = conn.as_mut() else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let index = i % calls.len();
                let call = &calls[index];
                i += 1;
                let sent = Instant::now();
                let result = send(c, addr, call).await;
                let measured = budget.is_some() || sent >= measure_from;
                match result {
                    Some((status, n)) if measured => {
                        requests += 1;
                        if status == 200 {
                            served[index] += 1;
                        }
                        bytes += n;
                        *statuses.entry(status).or_insert(0) += 1;
                        if let Some(h) = hist.as_mut() {
                            let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    Some(_) => {}
                    None => {
                        conn = None;
                        if measured {
                            errors += 1;
                        }
                    }
                }
            }
            (requests, errors, bytes, statuses, hist, served)
        }));
    }
    let mut out = Outcome {
        requests: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
            Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
        }),
        bytes: 0,
        served: vec![0; calls.len()],
    };
    for t in tasks {
        if let Ok((requests, errors, bytes, statuses, hist, served)) = t.await {
            for (total, n) in out.served.iter_mut().zip(served) {
                *total += n;
            }
            out.requests += requests;
            out.errors += errors;
            out.bytes += bytes;
            for (s, n) in statuses {
                *out.statuses.entry(s).or_insert(0) += n;
            }
            if let Some(h) = hist {
                let _ = out.latency.add(h);
            }
        }
    }
    out.elapsed = if budget.is_some() {
        start.elapsed()
    } else {
        Instant::now().saturating_duration_since(measure_from)
    };
    out
}
