//! What the shell asks of Envoy, as one trait: [`Host`]. [`Envoy`] implements it with the
//! proxy-wasm host calls, wrapped so that a failing host call is a value, never a panic (the
//! SDK's trait helpers `unwrap` internally); the shell's native tests implement it with a fake
//! (`filter::fake`), so the HTTP and root contexts run without a proxy.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::config::Config;
use crate::config::{ScopeFacts, ServiceConfig};
use crate::exchange::{Exchange, ResponseHead};
use crate::header_map::HeaderMap;
use crate::protocol::{Call, Outbound};
use crate::reply::Reply;
use crate::request::Properties;
use crate::response::OnChunk;
use crate::rls;
use crate::text::from_wire;

/// The most of a check answer the plugin reads; a decision is a few hundred bytes.
pub const MAX_CALL_BODY: usize = 64 * 1024;

/// The most of a response body read into the VM at once: a large chunk is read in slices so
/// that the plugin's memory does not grow with Envoy's buffer sizes.
pub const BODY_SLICE: usize = 64 * 1024;

/// Everything the shell asks of the proxy. Headers and properties come as bytes, exactly as
/// the client or upstream sent them ([`crate::text::from_wire`] makes them text): no value can
/// make a host call fail. A request's and a response's headers are read as one map each
/// (one host call, where a read by name is one per header).
pub trait Host {
    fn request_headers(&self) -> HeaderMap;
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    fn remove_request_header(&self, name: &str);
    /// Replaces the buffered request body (`size` bytes) with `body`.
    fn set_request_body(&self, size: usize, body: &[u8]) -> bool;
    fn response_headers(&self) -> HeaderMap;
    fn set_response_header(&self, name: &str, value: &str);
    /// Bytes `offset..offset + len` of the current response body chunk.
    fn response_body(&self, offset: usize, len: usize) -> Option<Vec<u8>>;
    /// Drops the first `drain` bytes of the current response body chunk and puts `data` in
    /// their place (`start` 0), or appends `data` to the chunk (`start` past its end): the two
    /// edits Envoy supports.
    fn edit_response_body(&self, start: usize, drain: usize, data: &[u8]) -> bool;
    fn remove_response_header(&self, name: &str);
    /// Resets the stream, upstream and downstream (a response already begun cannot end
    /// otherwise).
    fn reset_stream(&self);
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    fn plugin_configuration(&self, size: usize) -> Option<Vec<u8>>;
    /// Milliseconds since the epoch by the host's clock (0 if it cannot tell).
    fn now_ms(&self) -> u64;
    /// Asks for the root context's `on_tick` after `ms` (0 stops the ticks). Called from an
    /// HTTP context it still sets its root context's timer.
    fn set_tick_ms(&self, ms: u64);
    /// A random number, to make ids unique across VMs and restarts.
    fn random_seed(&self) -> u64;
    /// The VM's linear memory in bytes.
    fn vm_memory_bytes(&self) -> u64;
    /// Sends a check or a report to `service`; the callout's token.
    fn dispatch(
        &self,
        service: &ServiceConfig,
        outbound: &Outbound,
        timeout_ms: u64,
    ) -> Result<u32, Status>;
    /// The answer's `:status`, or `None` when the call ended without response headers.
    fn call_status(&self, num_headers: usize) -> Option<u32>;
    fn call_body(&self, size: usize) -> Vec<u8>;
    fn grpc_body(&self, size: usize) -> Vec<u8>;
    fn send_reply(&self, reply: &Reply);
    fn resume_request(&self);
    /// The current (root) context has finished what it delayed in `on_done`.
    fn done(&self);
    fn define_metric(&self, kind: MetricType, name: &str) -> Option<u32>;
    fn add_to_metric(&self, id: u32, n: i64);
    fn set_metric(&self, id: u32, value: u64);
}

/// Appending to a response body chunk: a start past any chunk's end.
pub const APPEND: usize = u32::MAX as usize;

/// Rewrites the current response body chunk (`size` bytes) a bounded slice at a time, in the
/// two edits Envoy allows: each slice is taken off the front, `f` says what replaces it, and
/// that is appended at the back, so after `size` bytes the chunk is the rewritten one in order.
/// Memory: one slice and what replaces it.
pub fn rewrite_response_body(
    host: &dyn Host,
    size: usize,
    mut f: impl FnMut(&[u8], &mut Vec<u8>),
) -> bool {
    let mut consumed = 0;
    let mut out = Vec::new();
    while consumed < size {
        let want = (size - consumed).min(BODY_SLICE);
        let Some(slice) = host.response_body(0, want).filter(|s| !s.is_empty()) else {
            return false;
        };
        consumed += slice.len();
        out.clear();
        f(&slice, &mut out);
        if !host.edit_response_body(0, slice.len(), &[])
            || (!out.is_empty() && !host.edit_response_body(APPEND, 0, &out))
        {
            return false;
        }
    }
    true
}

/// The current response body chunk (`size` bytes) handed to `f` a bounded slice at a time.
pub fn response_body_slices(host: &dyn Host, size: usize, mut f: impl FnMut(&[u8])) {
    let mut offset = 0;
    while offset < size {
        let want = (size - offset).min(BODY_SLICE);
        match host.response_body(offset, want) {
            Some(bytes) if !bytes.is_empty() => {
                offset += bytes.len();
                f(&bytes);
            }
            _ => return,
        }
    }
}

/// Envoy, through the proxy-wasm host calls.
pub struct Envoy;

fn dispatch_http(service: &ServiceConfig, call: &Call, timeout_ms: u64) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", call.method),
        (":path", call.path.as_str()),
        (":authority", service.authority.as_str()),
    ];
    if call.body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let authorization = service.api_key.as_ref().map(|k| format!("Bearer {k}"));
    if let Some(a) = &authorization {
        headers.push(("authorization", a.as_str()));
    }
    hostcalls::dispatch_http_call(
        &service.cluster,
        headers,
        call.body.as_deref(),
        Vec::new(),
        Duration::from_millis(timeout_ms),
    )
}

/// A whole header map. proxy-wasm 0.2.5's `get_map_bytes` would panic on a name that is not
/// UTF-8 or on a status it does not expect, so the host function is called here directly.
fn header_map(map: MapType) -> HeaderMap {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    }
    let (mut data, mut size): (*mut u8, usize) = (std::ptr::null_mut(), 0);
    // SAFETY: the host writes a pointer and a length to the two places given, nothing else.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != Status::Ok as u32 {
        // Never seen from Envoy; were it to happen, the request is read as one without headers.
        log::warn!("the proxy did not hand over a header map: status {status}");
    }
    if status != Status::Ok as u32 || data.is_null() {
        return HeaderMap::default();
    }
    // SAFETY: the host put `size` bytes at `data`, in memory it asked of this VM through the
    // SDK's `proxy_on_memory_allocate`, which leaks a boxed slice of exactly `size` bytes:
    // taking it back as a `Vec` of that length and capacity frees it when the map is dropped.
    let raw = unsafe { Vec::from_raw_parts(data, size, size) };
    let map = HeaderMap::parse(raw);
    if map.is_empty() && size > 0 {
        log::warn!("a header map of {size} bytes from the proxy was not in proxy-wasm's form");
    }
    map
}

fn buffer(kind: BufferType, offset: usize, size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, offset, size).ok().flatten()
}

/// One header's value as bytes. `get_map_value` (and `get_map`, whose names are unwrapped as
/// well) would panic on a byte that is not UTF-8, which a client or an upstream can send.
fn header_bytes(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

impl Host for Envoy {
    fn request_headers(&self) -> HeaderMap {
        header_map(MapType::HttpRequestHeaders)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpRequestBody, 0, size)
    }

    fn remove_request_header(&self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }

    fn set_request_body(&self, size: usize, body: &[u8]) -> bool {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body).is_ok()
    }

    fn response_headers(&self) -> HeaderMap {
        header_map(MapType::HttpResponseHeaders)
    }

    fn set_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
    }

    fn response_body(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpResponseBody, offset, len)
    }

    fn edit_response_body(&self, start: usize, drain: usize, data: &[u8]) -> bool {
        hostcalls::set_buffer(BufferType::HttpResponseBody, start, drain, data).is_ok()
    }

    fn remove_response_header(&self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
    }

    fn reset_stream(&self) {
        if let Err(status) = hostcalls::reset_http_response() {
            log::warn!("could not reset the stream: {status:?}");
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn plugin_configuration(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::PluginConfiguration, 0, size)
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn set_tick_ms(&self, ms: u64) {
        if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(ms)) {
            log::warn!("could not set the tick period: {status:?}");
        }
    }

    /// WASI `random_get` through std's hasher keys, mixed with the time.
    fn random_seed(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.now_ms());
        h.finish()
    }

    fn vm_memory_bytes(&self) -> u64 {
        #[cfg(target_arch = "wasm32")]
        {
            core::arch::wasm32::memory_size(0) as u64 * 65536
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            0
        }
    }

    fn dispatch(
        &self,
        service: &ServiceConfig,
        outbound: &Outbound,
        timeout_ms: u64,
    ) -> Result<u32, Status> {
        match outbound {
            Outbound::Http(call) => dispatch_http(service, call, timeout_ms),
            Outbound::Grpc(message) => {
                // gRPC carries the key as the same header, in the call's initial metadata.
                let authorization = service.api_key.as_ref().map(|k| format!("Bearer {k}"));
                let metadata: Vec<(&str, &[u8])> = authorization
                    .iter()
                    .map(|a| ("authorization", a.as_bytes()))
                    .collect();
                hostcalls::dispatch_grpc_call(
                    &service.cluster,
                    rls::SERVICE,
                    rls::METHOD,
                    metadata,
                    Some(message),
                    Duration::from_millis(timeout_ms),
                )
            }
        }
    }

    fn call_status(&self, num_headers: usize) -> Option<u32> {
        if num_headers == 0 {
            return None;
        }
        let status = header_bytes(MapType::HttpCallResponseHeaders, ":status")?;
        std::str::from_utf8(&status).ok()?.parse().ok()
    }

    fn call_body(&self, size: usize) -> Vec<u8> {
        if size == 0 {
            return Vec::new();
        }
        buffer(BufferType::HttpCallResponseBody, 0, size.min(MAX_CALL_BODY)).unwrap_or_default()
    }

    fn grpc_body(&self, size: usize) -> Vec<u8> {
        if size == 0 {
            return Vec::new();
        }
        buffer(BufferType::GrpcReceiveBuffer, 0, size.min(MAX_CALL_BODY)).unwrap_or_default()
    }

    fn send_reply(&self, reply: &Reply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(status) = hostcalls::send_http_response(reply.status, headers, Some(&reply.body))
        {
            log::error!("could not send the local reply: {status:?}");
        }
    }

    fn resume_request(&self) {
        if let Err(status) = hostcalls::resume_http_request() {
            log::warn!("could not resume the request: {status:?}");
        }
    }

    fn done(&self) {
        if let Err(status) = hostcalls::done() {
            log::warn!("could not finish the root context: {status:?}");
        }
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Option<u32> {
        hostcalls::define_metric(kind, name)
            .inspect_err(|status| log::warn!("could not define metric {name}: {status:?}"))
            .ok()
    }

    fn add_to_metric(&self, id: u32, n: i64) {
        let _ = hostcalls::increment_metric(id, n);
    }

    fn set_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Envoy attributes, read through the host on demand.
pub struct HostProperties<'h>(pub &'h dyn Host);

impl Properties for HostProperties<'_> {
    fn property(&self, path: &[&str]) -> Option<String> {
        self.0.property(path).map(from_wire)
    }
}

/// What a Higress-style scope looks at, read only when a scope asks (the host from the
/// request's header map).
pub struct HostScope<'h>(pub &'h dyn Host, pub &'h HeaderMap);

impl ScopeFacts for HostScope<'_> {
    fn route(&mut self) -> Option<String> {
        let route = self.0.property(&["xds", "route_name"]).map(from_wire);
        route.filter(|r| !r.is_empty())
    }

    fn host(&mut self) -> Option<String> {
        let authority = self.1.get(":authority");
        authority.map(|a| crate::matcher::normalize_host(&from_wire(a.to_vec())))
    }

    fn cluster(&mut self) -> Option<String> {
        let cluster = self.0.property(&["xds", "cluster_name"]).map(from_wire);
        cluster.filter(|c| !c.is_empty())
    }
}

/// The request headers `names` (each its first value, as text: [`from_wire`]).
pub fn read_headers(map: &HeaderMap, names: &[String]) -> Vec<(String, String)> {
    let read = |name: &String| Some((name.clone(), from_wire(map.get(name)?.to_vec())));
    names.iter().filter_map(read).collect()
}

/// The response's head as the exchange reads it (Gemini's tier only when it can change a price).
pub fn response_head(host: &dyn Host, end_of_stream: bool, tier: bool) -> ResponseHead {
    let map = host.response_headers();
    let content_type = map.get("content-type");
    ResponseHead {
        status: map
            .get(":status")
            .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
            .unwrap_or(0),
        // Upstream bytes: an encoding that is not UTF-8 is one the scanner cannot read.
        encoding: map.get("content-encoding").map(|e| from_wire(e.to_vec())),
        event_stream: content_type.is_some_and(|t| {
            t.get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
        }),
        tier: tier
            .then(|| map.get("x-gemini-service-tier"))
            .flatten()
            .and_then(|t| String::from_utf8(t.to_vec()).ok()),
        end_of_stream,
    }
}

/// One response body chunk (`size` bytes) of an admitted request, handled as its exchange says:
/// read, rewritten (usage the client did not ask for taken out), ended in the
/// provider's shape, or dropped after such an end (and the stream reset once its drain is over).
pub fn pass_response(
    host: &dyn Host,
    exchange: &mut Exchange,
    config: &Config,
    size: usize,
    end_of_stream: bool,
) {
    let now_ms = host.now_ms();
    let written = match exchange.response_chunk(now_ms) {
        OnChunk::Pass => true,
        OnChunk::Drop { reset } => {
            if reset {
                host.reset_stream();
            }
            size == 0 || host.edit_response_body(0, size, &[])
        }
        OnChunk::Read => {
            let (mut offset, mut end) = (0, None);
            response_body_slices(host, size, |slice| {
                if end.is_none() {
                    end = exchange
                        .response_slice(config, slice, now_ms, None)
                        .map(|(keep, ending)| (offset + keep, ending));
                }
                offset += slice.len();
            });
            match end {
                None => true,
                Some((keep, ending)) => {
                    let mut at = 0;
                    let kept = keep == size
                        || rewrite_response_body(host, size, |slice, out| {
                            let wanted = keep.saturating_sub(at).min(slice.len());
                            out.extend_from_slice(slice.get(..wanted).unwrap_or_default());
                            at += slice.len();
                        });
                    kept && host.edit_response_body(APPEND, 0, &ending)
                }
            }
        }
        OnChunk::Rewrite => {
            let mut written = rewrite_response_body(host, size, |slice, out| {
                exchange.response_slice(config, slice, now_ms, Some(out));
            });
            if end_of_stream {
                let mut rest = Vec::new();
                exchange.response_flush(&mut rest);
                written &= rest.is_empty() || host.edit_response_body(APPEND, 0, &rest);
            }
            written
        }
    };
    if !written {
        log::warn!("could not rewrite the response body");
    }
    if end_of_stream {
        exchange.response_end();
    }
}

/// The request headers a limited request reads, out of the request's `map`, when `matches`
/// select it: those the matches read first (all a request that matches nothing turns into
/// text), then the rest.
pub fn selected(map: &HeaderMap, config: &crate::config::Config) -> Option<Vec<(String, String)>> {
    let mut headers = read_headers(map, config.match_headers());
    let list = crate::matcher::HeaderList(&headers);
    if !config.matches.is_empty() && !crate::matcher::any_matches(&config.matches, &list) {
        return None;
    }
    headers.extend(read_headers(map, config.headers_after_match()));
    Some(headers)
}
