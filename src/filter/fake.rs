//! A fake proxy for the shell's native tests: it holds the request and response a test sets,
//! records what the shell asks (callouts with their tokens, replies, resumes, timers,
//! metrics), and runs on a clock the test moves.

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::types::{MetricType, Status};

use super::host::Host;
use crate::config::ServiceConfig;
use crate::header_map::HeaderMap;
use crate::protocol::Outbound;
use crate::reply::Reply;

#[derive(Default)]
pub struct State {
    /// Values as bytes, as a client may send them.
    pub request_headers: Vec<(String, Vec<u8>)>,
    pub request_body: Vec<u8>,
    pub response_headers: Vec<(String, Vec<u8>)>,
    pub response_body: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    pub config: Vec<u8>,
    pub now_ms: u64,
    pub tick_ms: u64,
    /// Every callout made, with its token.
    pub calls: Vec<(u32, Outbound)>,
    pub refuse_dispatch: bool,
    /// What `call_status` / `call_body` answer for the callout being delivered.
    pub answer: (u32, Vec<u8>),
    pub replies: Vec<Reply>,
    pub resumed: usize,
    /// Streams reset.
    pub resets: usize,
    pub done: bool,
    metric_names: Vec<String>,
    metric_values: Vec<i64>,
    /// How many times each host function was called.
    pub host_calls: HashMap<&'static str, usize>,
}

#[derive(Default)]
pub struct FakeHost(pub RefCell<State>);

impl FakeHost {
    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        self.0.borrow_mut()
    }

    /// A metric's value by its short name (`checks_allowed`).
    pub fn metric(&self, name: &str) -> i64 {
        let s = self.0.borrow();
        let full = format!("llm_token_ratelimit.{name}");
        s.metric_names
            .iter()
            .position(|n| *n == full)
            .map_or(0, |i| s.metric_values[i])
    }

    /// The JSON body of callout `i`.
    pub fn call_json(&self, i: usize) -> serde_json::Value {
        match &self.0.borrow().calls[i].1 {
            Outbound::Http(call) => {
                serde_json::from_slice(call.body.as_deref().unwrap_or_default()).unwrap_or_default()
            }
            Outbound::Grpc(_) => serde_json::Value::Null,
        }
    }

    pub fn call_path(&self, i: usize) -> String {
        match &self.0.borrow().calls[i].1 {
            Outbound::Http(call) => call.path.clone(),
            Outbound::Grpc(_) => String::new(),
        }
    }

    pub fn token(&self, i: usize) -> u32 {
        self.0.borrow().calls[i].0
    }

    fn tally(&self, function: &'static str) {
        *self.state().host_calls.entry(function).or_default() += 1;
    }

    /// Host calls made since the last time this was asked, by function.
    pub fn take_host_calls(&self) -> HashMap<&'static str, usize> {
        std::mem::take(&mut self.state().host_calls)
    }

    pub fn calls(&self) -> usize {
        self.0.borrow().calls.len()
    }
}

/// Pairs from `&str`s, for tests.
pub fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

impl Host for FakeHost {
    fn request_headers(&self) -> HeaderMap {
        self.tally("request_headers");
        let s = self.0.borrow();
        HeaderMap::parse(HeaderMap::encode(&s.request_headers))
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.tally("request_body");
        let s = self.0.borrow();
        Some(s.request_body[..size.min(s.request_body.len())].to_vec())
    }

    fn remove_request_header(&self, name: &str) {
        self.tally("remove_request_header");
        self.state()
            .request_headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn set_request_body(&self, _size: usize, body: &[u8]) -> bool {
        self.tally("set_request_body");
        self.state().request_body = body.to_vec();
        true
    }

    fn response_headers(&self) -> HeaderMap {
        self.tally("response_headers");
        HeaderMap::parse(HeaderMap::encode(&self.0.borrow().response_headers))
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.tally("set_response_header");
        let mut s = self.state();
        s.response_headers.retain(|(k, _)| k != name);
        s.response_headers
            .push((name.into(), value.as_bytes().to_vec()));
    }

    fn response_body(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        self.tally("response_body");
        let s = self.0.borrow();
        let end = (offset + len).min(s.response_body.len());
        s.response_body.get(offset..end).map(<[u8]>::to_vec)
    }

    fn edit_response_body(&self, start: usize, drain: usize, data: &[u8]) -> bool {
        self.tally("edit_response_body");
        let mut s = self.state();
        let len = s.response_body.len();
        if start >= len {
            s.response_body.extend_from_slice(data);
        } else if start == 0 {
            s.response_body
                .splice(..drain.min(len), data.iter().copied());
        } else {
            // Envoy refuses edits in the middle of a chunk.
            return false;
        }
        true
    }

    fn remove_response_header(&self, name: &str) {
        self.tally("remove_response_header");
        self.state()
            .response_headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn reset_stream(&self) {
        self.tally("reset_stream");
        self.state().resets += 1;
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.tally("property");
        self.0.borrow().properties.get(&path.join(".")).cloned()
    }

    fn plugin_configuration(&self, _size: usize) -> Option<Vec<u8>> {
        self.tally("plugin_configuration");
        Some(self.0.borrow().config.clone())
    }

    fn now_ms(&self) -> u64 {
        self.tally("now_ms");
        self.0.borrow().now_ms
    }

    fn set_tick_ms(&self, ms: u64) {
        self.tally("set_tick_ms");
        self.state().tick_ms = ms;
    }

    fn random_seed(&self) -> u64 {
        self.tally("random_seed");
        0xfeed
    }

    fn vm_memory_bytes(&self) -> u64 {
        self.tally("vm_memory_bytes");
        0
    }

    fn dispatch(
        &self,
        _service: &ServiceConfig,
        outbound: &Outbound,
        _timeout_ms: u64,
    ) -> Result<u32, Status> {
        self.tally("dispatch");
        let mut s = self.state();
        if s.refuse_dispatch {
            return Err(Status::BadArgument);
        }
        // Tokens as Envoy gives them: distinct, not in any order the plugin could rely on.
        let token = 100 + 7 * s.calls.len() as u32;
        s.calls.push((token, outbound.clone()));
        Ok(token)
    }

    fn call_status(&self, num_headers: usize) -> Option<u32> {
        self.tally("call_status");
        (num_headers > 0).then(|| self.0.borrow().answer.0)
    }

    fn call_body(&self, _size: usize) -> Vec<u8> {
        self.tally("call_body");
        self.0.borrow().answer.1.clone()
    }

    fn grpc_body(&self, _size: usize) -> Vec<u8> {
        self.tally("grpc_body");
        self.0.borrow().answer.1.clone()
    }

    fn send_reply(&self, reply: &Reply) {
        self.tally("send_reply");
        self.state().replies.push(reply.clone());
    }

    fn resume_request(&self) {
        self.tally("resume_request");
        self.state().resumed += 1;
    }

    fn done(&self) {
        self.tally("done");
        self.state().done = true;
    }

    fn define_metric(&self, _kind: MetricType, name: &str) -> Option<u32> {
        self.tally("define_metric");
        let mut s = self.state();
        if let Some(i) = s.metric_names.iter().position(|n| n == name) {
            return Some(i as u32);
        }
        s.metric_names.push(name.into());
        s.metric_values.push(0);
        Some(s.metric_names.len() as u32 - 1)
    }

    fn add_to_metric(&self, id: u32, n: i64) {
        self.tally("add_to_metric");
        if let Some(v) = self.state().metric_values.get_mut(id as usize) {
            *v += n;
        }
    }

    fn set_metric(&self, id: u32, value: u64) {
        self.tally("set_metric");
        if let Some(v) = self.state().metric_values.get_mut(id as usize) {
            *v = value as i64;
        }
    }
}
