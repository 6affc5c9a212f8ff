//! Host calls the adapter needs, wrapped so that a failing host call is a value, never a panic
//! (the SDK's trait helpers `unwrap` internally).

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};

use crate::protocol::Call;
use crate::reply::Reply;

/// The most of a check answer the plugin reads; a decision is a few hundred bytes.
const MAX_CALL_BODY: usize = 64 * 1024;

pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
}

pub fn request_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
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

/// The callout's `:status`, or `None` when it ended without response headers.
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
