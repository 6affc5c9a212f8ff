//! Host calls the adapter needs, wrapped so that a failing host call is a value, never a panic
//! (the SDK's trait helpers `unwrap` internally).

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};

use crate::config::ServiceConfig;
use crate::protocol::{Call, Outbound};
use crate::reply::Reply;
use crate::rls;

/// The most of a check answer the plugin reads; a decision is a few hundred bytes.
const MAX_CALL_BODY: usize = 64 * 1024;

/// The most of a response body read into the VM at once: a large chunk is read in slices so
/// that the plugin's memory does not grow with Envoy's buffer sizes.
const BODY_SLICE: usize = 64 * 1024;

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
}

pub fn request_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
}

pub fn remove_request_header(name: &str) {
    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
}

/// Replaces the buffered request body (`size` bytes) with `body`.
pub fn set_request_body(size: usize, body: &[u8]) -> bool {
    hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body).is_ok()
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Hands the current response body chunk (`size` bytes) to `f`, a bounded slice at a time.
pub fn response_body_slices(size: usize, mut f: impl FnMut(&[u8])) {
    let mut offset = 0;
    while offset < size {
        let want = (size - offset).min(BODY_SLICE);
        match hostcalls::get_buffer(BufferType::HttpResponseBody, offset, want) {
            Ok(Some(bytes)) if !bytes.is_empty() => {
                offset += bytes.len();
                f(&bytes);
            }
            _ => return,
        }
    }
}

/// Milliseconds since the epoch by the host's clock (0 if it cannot tell).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Asks for the root context's `on_tick` after `ms` (0 stops the ticks). Called from an HTTP
/// context it still sets its root context's timer.
pub fn set_tick_ms(ms: u64) {
    if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(ms)) {
        log::warn!("could not set the tick period: {status:?}");
    }
}

/// A random number from the host (WASI `random_get` through std's hasher keys), mixed with
/// the time, to make report ids unique across VMs and restarts.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// The VM's linear memory in bytes.
pub fn vm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

pub fn property(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    String::from_utf8(bytes).ok()
}

pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
}

pub fn dispatch(
    cluster: &str,
    authority: &str,
    call: &Call,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", call.method),
        (":path", call.path.as_str()),
        (":authority", authority),
    ];
    if call.body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    hostcalls::dispatch_http_call(
        cluster,
        headers,
        call.body.as_deref(),
        Vec::new(),
        Duration::from_millis(timeout_ms),
    )
}

/// Sends a check or a report to `service`.
pub fn dispatch_outbound(
    service: &ServiceConfig,
    outbound: &Outbound,
    timeout_ms: u64,
) -> Result<u32, Status> {
    match outbound {
        Outbound::Http(call) => dispatch(&service.cluster, &service.authority, call, timeout_ms),
        Outbound::Grpc(message) => hostcalls::dispatch_grpc_call(
            &service.cluster,
            rls::SERVICE,
            rls::METHOD,
            Vec::new(),
            Some(message),
            Duration::from_millis(timeout_ms),
        ),
    }
}

/// The body of a gRPC callout's answer.
pub fn grpc_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size.min(MAX_CALL_BODY))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The request's `:status`, or `None` when it ended without response headers.
pub fn call_status(num_headers: usize) -> Option<u32> {
    if num_headers == 0 {
        return None;
    }
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
}

pub fn call_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size.min(MAX_CALL_BODY))
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn send_reply(reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Err(status) = hostcalls::send_http_response(reply.status, headers, Some(&reply.body)) {
        log::error!("could not send the local reply: {status:?}");
    }
}

pub fn resume_request() {
    if let Err(status) = hostcalls::resume_http_request() {
        log::warn!("could not resume the request: {status:?}");
    }
}

pub fn set_response_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
}
