//! `mock-llm`: serves the mock LLM APIs of the library on `--listen` until Ctrl-C / SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mock_llm::{error_body, Ask};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "A mock LLM upstream (OpenAI, Anthropic, Gemini, DashScope shapes)")]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MOCK_LLM_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let listener = match TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-llm: cannot listen on {}: {e}", cli.listen);
            return std::process::ExitCode::from(1);
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| cli.listen.to_string(), |a| a.to_string());
    eprintln!("mock-llm: listening on {addr} (OpenAI, Anthropic, Gemini, DashScope)");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(answer))
                        .await;
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    std::process::ExitCode::SUCCESS
}

fn full(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if path == "/healthz" {
        return Ok(full(StatusCode::OK, "text/plain", "ok\n".into()));
    }
    let headers = req.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let num = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
    let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(full(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                String::new(),
            ))
        }
    };
    if let Some(status) = num("x-mock-status").and_then(|s| StatusCode::from_u16(s as u16).ok()) {
        return Ok(full(
            status,
            "application/json",
            error_body(status.as_u16()),
        ));
    }
    let Some(ask) = Ask::read(&path, &body, header) else {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            error_body(404),
        ));
    };
    if let Some(ms) = num("x-mock-latency-ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let content_type = ask.content_type();
    let delay = Duration::from_millis(num("x-mock-delay-ms").unwrap_or(0));
    let chunk = num("x-mock-chunk-bytes").map(|n| n.max(1) as usize);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let frames = ask.body();
    tokio::spawn(async move {
        let mut pending: Vec<u8> = Vec::new();
        for (i, frame) in frames.enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let out = match chunk {
                None => vec![Bytes::from(frame)],
                Some(n) => {
                    pending.extend_from_slice(frame.as_bytes());
                    let whole = pending.len() / n * n;
                    let ready: Vec<u8> = pending.drain(..whole).collect();
                    ready.chunks(n).map(Bytes::copy_from_slice).collect()
                }
            };
            for b in out {
                if tx.send(b).await.is_err() {
                    return; // the client went away
                }
            }
        }
        if !pending.is_empty() {
            let _ = tx.send(Bytes::from(pending)).await;
        }
    });
    let stream = futures_stream(rx);
    let mut r = Response::new(StreamBody::new(stream).boxed());
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// The channel as a body stream.
fn futures_stream(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))))
}
